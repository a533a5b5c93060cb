"""MAML and first-order MAML (Finn et al. 2017)."""

from __future__ import annotations

import copy
from collections.abc import Collection

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_metakd.algorithms.base import MetaAlgorithm
from lightning_metakd.algorithms.inner_loop import Params, check_logits, inner_loop


class MAML(MetaAlgorithm):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

    Each task adapts all parameters by ``inner_steps`` steps of gradient descent on its support set,
    θ'_i = θ − α ∇θ L_Ti(f_θ) (eq. 1); the meta-objective is the query loss of the adapted model,
    min_θ Σ_i L_Ti(f_θ'_i) (eq. 2), differentiated through the inner steps (second order) unless
    ``first_order`` (FOMAML, §5.2, which drops the second derivatives).

    The model is a classifier with ``ways`` outputs (``needs_head = True``), e.g.
    ``Classifier(Conv4(), ways=5)``. In evaluation (``training=False``) it takes
    ``inner_steps_test`` steps and keeps no second-order graph (same logits, less memory).

    Args:
        inner_lr: step size α. Finn et al. use 0.4 for 5-way Omniglot with one step in training
            and three at test time (``inner_steps=1, inner_steps_test=3``); 0.01 with 5/10 steps
            for mini-ImageNet.
        inner_steps: inner steps in training.
        inner_steps_test: inner steps in validation and test; ``None`` means ``inner_steps``.
        first_order: first-order approximation (FOMAML).
        checkpoint_steps: gradient checkpointing of the inner loop (second order, training
            only): each inner step keeps only its parameter-sized inputs and is recomputed in the
            outer backward, so a task's graph no longer grows by one step's activations per step;
            costs one extra support forward and inner gradient per step, gives the same
            meta-gradients (see :func:`inner_loop`). Needs the loop over tasks: it cannot run
            under ``torch.func.vmap`` (``MetaLearnerModule(vmap_tasks=True)`` raises).

    Example:
        >>> import torch
        >>> from lightning_metakd.models import Conv4
        >>> from lightning_metakd.models.classifier import Classifier
        >>> model, maml = Classifier(Conv4(hidden=8), ways=5), MAML(inner_lr=0.4)
        >>> params = dict(model.named_parameters())
        >>> logits = maml.episode_logits(model, params, torch.randn(2, 5, 1, 28, 28),
        ...     torch.arange(5).expand(2, 5), torch.randn(2, 15, 1, 28, 28), ways=5, training=True)
        >>> logits.shape
        torch.Size([2, 15, 5])
    """

    needs_head = True

    def __init__(
        self,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        inner_steps_test: int | None = None,
        first_order: bool = False,
        checkpoint_steps: bool = False,
    ) -> None:
        super().__init__(inner_steps=inner_steps, inner_steps_test=inner_steps_test)
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr}.")
        self.inner_lr = inner_lr
        self.first_order = first_order
        self.checkpoint_steps = checkpoint_steps

    def check_vmap(self) -> None:
        if self.checkpoint_steps:
            raise ValueError(
                f"{type(self).__name__}(checkpoint_steps=True) cannot adapt tasks under "
                "torch.func.vmap: its recomputed inner steps are a custom autograd.Function "
                "without a vmap rule. Either set vmap_tasks=False on the MetaLearnerModule (the "
                "loop over tasks; task_chunk_size then sets how many task graphs are alive), or "
                "keep vmap with checkpoint_steps=False and bound memory with task_chunk_size."
            )

    def adapted_names(self, params: Params) -> Collection[str] | None:
        """Names of the parameters that the inner loop changes (``None``: all of them)."""
        return None

    def adapted_params(self, params: Params, state: Params) -> Params:
        """θ': the adapted parameters are the state."""
        return state

    def step_sizes(self) -> float | Params:
        """The inner learning rate(s) handed to :func:`inner_loop`."""
        return self.inner_lr

    def adapt(
        self,
        model: nn.Module,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        ways: int,
        training: bool,
    ) -> Params:
        """The adapted parameters θ' of one task."""
        return inner_loop(
            model,
            params,
            support_x,
            support_y,
            inner_lr=self.step_sizes(),
            inner_steps=self.steps(training),
            first_order=self.first_order or not training,
            adapt=self.adapted_names(params),
            checkpoint_steps=self.checkpoint_steps,
        )

    def logits(
        self, model: nn.Module, params: Params, state: Params, query_x: Tensor, ways: int
    ) -> Tensor:
        """``f_θ'(query_x)``: ``[N*Q, ways]``."""
        return check_logits(functional_call(model, state, (query_x,)), ways, model)

    def fold(self, model: nn.Module, state: Params) -> nn.Module:
        """A copy of ``model`` holding the adapted parameters θ' of ``state``."""
        folded = copy.deepcopy(model)
        with torch.no_grad():
            for name, param in folded.named_parameters():
                param.copy_(state[name])
        return folded

    def extra_repr(self) -> str:
        return (
            f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
            f"inner_steps_test={self.inner_steps_test}, first_order={self.first_order}, "
            f"checkpoint_steps={self.checkpoint_steps}"
        )


__all__ = ["MAML"]

"""Meta-SGD: meta-learned per-parameter inner learning rates (Li et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_metakd.algorithms.inner_loop import Params
from lightning_metakd.algorithms.maml import MAML


def _key(name: str) -> str:
    return name.replace(".", "__")


class MetaSGD(MAML):
    """Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
    Learning").

    MAML with a learned step size per parameter entry: θ' = θ − α ∘ ∇θ L_T(θ) (eq. 3 of the
    paper), where α has the shape of θ and is meta-learned together with θ by the outer loss.

    The learning rates depend on the model, so they are created by :meth:`build`, which the owning
    LightningModule calls once in its ``__init__`` (before the optimiser is configured and before a
    checkpoint is loaded, so they are optimised and checkpointed as ``inner_lrs.<name>``, with the
    dots of the parameter name replaced by ``__``). Each starts at ``inner_lr``.

    Args:
        inner_lr: initial value of every learning rate (Li et al. draw them uniformly from
            [0.005, 0.1]; a constant start makes step 0 equal to MAML with that ``inner_lr``).
        inner_steps, inner_steps_test, first_order: as for :class:`MAML` (the paper uses one
            step; with ``first_order`` the learning rates still receive gradients).
        checkpoint_steps: as for :class:`MAML`; each recomputed step also stores its learning
            rates (parameter-sized) and returns their meta-gradient.

    Example:
        >>> from lightning_metakd.models import Conv4
        >>> from lightning_metakd.models.classifier import Classifier
        >>> model, algo = Classifier(Conv4(hidden=8), ways=5), MetaSGD(inner_lr=0.1)
        >>> algo.build(model)
        >>> algo.inner_lrs["head__weight"].shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        inner_steps_test: int | None = None,
        first_order: bool = False,
        checkpoint_steps: bool = False,
    ) -> None:
        super().__init__(inner_lr, inner_steps, inner_steps_test, first_order, checkpoint_steps)
        self.inner_lrs = nn.ParameterDict()
        self._names: dict[str, str] = {}

    def build(self, model: nn.Module) -> None:
        """Create one learning-rate tensor per parameter of ``model`` (idempotent)."""
        names = {_key(n): n for n, _ in model.named_parameters()}
        if len(names) != len(list(model.parameters())):
            raise ValueError(
                "MetaSGD cannot name the learning rates of this model uniquely: two parameter "
                "names differ only in '.' versus '__'. Rename one of them."
            )
        for key, name in names.items():
            param = model.get_parameter(name)
            if key not in self.inner_lrs:
                self.inner_lrs[key] = nn.Parameter(torch.full_like(param, self.inner_lr))
        self._names = names

    def step_sizes(self) -> Params:
        if not self._names:
            raise RuntimeError(
                "MetaSGD has no learning rates yet: call algorithm.build(model) once before "
                "adaptation (MetaLearnerModule does this in its __init__)."
            )
        return {name: self.inner_lrs[key] for key, name in self._names.items()}


__all__ = ["MetaSGD"]

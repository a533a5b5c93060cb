"""The interface every meta-learning algorithm implements, and the BatchNorm policy."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from lightning_metakd.algorithms.engine import map_tasks
from lightning_metakd.algorithms.inner_loop import Params
from lightning_metakd.algorithms.normalization import (
    TRANSDUCTIVE,
    Normalization,
    TaskState,
    batch_norm_statistics,
)


class MetaAlgorithm(nn.Module):
    """How a model turns one task's support set into predictions on its query set.

    An algorithm is an ``nn.Module`` only so that learnable meta-parameters (Meta-SGD's learning
    rates) are registered, optimised and checkpointed with the LightningModule that owns it; the
    network itself is passed in, never stored. Every method is functional in ``params`` (a
    ``{name: tensor}`` of the model's parameters, usually ``dict(model.named_parameters())``), so
    the same code serves a Python loop over tasks and :func:`torch.func.vmap`.

    Subclasses implement :meth:`adapt` (the task state: adapted parameters for the MAML family,
    prototypes or the support embedding for metric methods) and :meth:`logits`.

    Attributes:
        needs_head: ``True`` when the model must be a classifier with ``ways`` outputs
            (:class:`~lightning_metakd.models.classifier.Classifier`; MAML, ANIL, Meta-SGD);
            ``False`` when it is the bare backbone (ProtoNet, MatchingNet).
        inner_steps: inner gradient steps in training (0 for metric methods).
        inner_steps_test: inner gradient steps in validation and test.

    Example:
        >>> import torch
        >>> from lightning_metakd.algorithms import ProtoNet
        >>> from lightning_metakd.models import Conv4
        >>> net, algo = Conv4(hidden=8), ProtoNet()
        >>> params = dict(net.named_parameters())
        >>> sx, sy = torch.randn(2, 6, 1, 28, 28), torch.arange(3).repeat(2).expand(2, 6)
        >>> algo.episode_logits(net, params, sx, sy, torch.randn(2, 9, 1, 28, 28), ways=3,
        ...                     training=True).shape
        torch.Size([2, 9, 3])
    """

    needs_head: bool = True

    def __init__(self, inner_steps: int = 0, inner_steps_test: int | None = None) -> None:
        super().__init__()
        if inner_steps < 0 or (inner_steps_test is not None and inner_steps_test < 0):
            raise ValueError(
                f"inner_steps and inner_steps_test must be non-negative, got {inner_steps} and "
                f"{inner_steps_test}."
            )
        self.inner_steps = inner_steps
        self.inner_steps_test = inner_steps if inner_steps_test is None else inner_steps_test

    def build(self, model: nn.Module) -> None:
        """Create meta-parameters that depend on the model (no-op here; see ``MetaSGD.build``).

        The owning LightningModule calls it once in its ``__init__``, so the parameters exist
        before the optimiser is configured and before a checkpoint's ``state_dict`` is loaded.
        """

    def check_vmap(self) -> None:
        """Raise ``ValueError``, naming the fix, if this algorithm cannot run under vmap.

        Called wherever vmapped adaptation is chosen (:meth:`episode_logits`, and
        ``MetaLearnerModule`` at construction and setup, so a bad combination fails before the
        first step). Every algorithm here can, except the MAML family with ``checkpoint_steps``.
        """

    def steps(self, training: bool) -> int:
        """Inner steps for training (``inner_steps``) or evaluation (``inner_steps_test``)."""
        return self.inner_steps if training else self.inner_steps_test

    def adapt(
        self,
        model: nn.Module,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        ways: int,
        training: bool,
    ) -> Any:
        """The task state computed from one task's support set (``[N*K, ...]`` and ``[N*K]``)."""
        raise NotImplementedError

    def logits(
        self, model: nn.Module, params: Params, state: Any, query_x: Tensor, ways: int
    ) -> Tensor:
        """Class scores ``[N*Q, ways]`` of one task's query images ``[N*Q, C, H, W]``."""
        raise NotImplementedError

    def adapted_params(self, params: Params, state: Any) -> Params:
        """The parameters the adapted network runs with: θ' for the MAML family, θ otherwise."""
        return params

    def adapt_task(
        self,
        model: nn.Module,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        ways: int,
        training: bool,
        normalization: Normalization = TRANSDUCTIVE,
    ) -> TaskState:
        """:meth:`adapt` under a normalisation policy: the state and the statistics queries use.

        ``"transductive"``: plain :meth:`adapt`, no statistics. ``"support"``: :meth:`adapt`,
        then one support pass with the adapted parameters records every BatchNorm's statistics
        (:class:`~lightning_metakd.algorithms.normalization.batch_norm_statistics`).
        ``"population"``: the inner loop and the queries normalise with the population statistics
        (in training, batch statistics, as BatchNorm trains).
        """
        policy = normalization.policy
        if policy == "population" and not training:
            with batch_norm_statistics(model, normalization.population):
                state = self.adapt(model, params, support_x, support_y, ways, training)
            return TaskState(state, normalization.population)
        state = self.adapt(model, params, support_x, support_y, ways, training)
        if policy == "support":
            with batch_norm_statistics(model) as record:
                functional_call(model, self.adapted_params(params, state), (support_x,))
            return TaskState(state, record.recorded)
        return TaskState(state, None)

    def predict_task(
        self, model: nn.Module, params: Params, task: TaskState, query_x: Tensor, ways: int
    ) -> Tensor:
        """:meth:`logits` of ``query_x`` with the statistics of ``task`` (if any): ``[M, ways]``."""
        if task.statistics is None:
            return self.logits(model, params, task.state, query_x, ways)
        with batch_norm_statistics(model, task.statistics):
            return self.logits(model, params, task.state, query_x, ways)

    def task_logits(
        self,
        model: nn.Module,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        ways: int,
        training: bool,
        normalization: Normalization = TRANSDUCTIVE,
    ) -> Tensor:
        """:meth:`adapt_task` then :meth:`predict_task` for ONE task: ``[N*Q, ways]``.

        The single function that both the loop and the vmap path of :meth:`episode_logits` call.
        """
        task = self.adapt_task(model, params, support_x, support_y, ways, training, normalization)
        return self.predict_task(model, params, task, query_x, ways)

    def episode_logits(
        self,
        model: nn.Module,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        ways: int,
        training: bool,
        vmap_tasks: bool | None = None,
        chunk_size: int | None = None,
        normalization: Normalization = TRANSDUCTIVE,
    ) -> Tensor:
        """Query logits of all ``T`` tasks of an episode: ``[T, N*Q, ways]``.

        :meth:`task_logits` mapped over the tasks by the episode engine
        (:func:`~lightning_metakd.algorithms.engine.map_tasks`).

        Args:
            model, params: the network and its parameters (``dict(model.named_parameters())``).
            support_x, support_y, query_x: ``[T, N*K, C, H, W]``, ``[T, N*K]``,
                ``[T, N*Q, C, H, W]``.
            ways: N.
            training: use ``inner_steps`` (and keep the second-order graph) rather than
                ``inner_steps_test``.
            vmap_tasks: ``True``: :func:`torch.func.vmap` over tasks; ``False``: a Python loop;
                ``None``: the loop on CPU, vmap elsewhere
                (:func:`~lightning_metakd.algorithms.engine.use_vmap`). Same numbers either way.
            chunk_size: with vmap, process at most this many tasks at once (bounds memory).
            normalization: the BatchNorm policy (:class:`Normalization`; default transductive).
        """
        if support_x.dim() < 3 or support_y.dim() != 2 or query_x.dim() != support_x.dim():
            raise ValueError(
                "episode_logits expects batched tasks: support_x [T, N*K, ...], "
                f"support_y [T, N*K], query_x [T, N*Q, ...]; got {tuple(support_x.shape)}, "
                f"{tuple(support_y.shape)}, {tuple(query_x.shape)}. For one task call task_logits."
            )

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
            return self.task_logits(model, params, sx, sy, qx, ways, training, normalization)

        return map_tasks(
            one_task,
            (support_x, support_y, query_x),
            vmap_tasks=vmap_tasks,
            chunk_size=chunk_size,
            algorithms=[self],
        )

    def fold(self, model: nn.Module, state: Any) -> nn.Module:
        """A plain module ``images -> [B, ways]`` logits: ``model`` adapted to the task of ``state``.

        What deployment freezes (:class:`~lightning_metakd.deploy.FixedClassifier`): MAML-family
        algorithms copy θ' into a copy of the model, ProtoNet wraps it with its prototypes,
        MatchingNet with its support set. The result's constructor arguments are stored on it, so
        a checkpoint can describe it. ``model`` itself is not modified.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not say how to fold its adapted state into a fixed "
            "classifier; implement fold(model, state) (see MAML.fold, ProtoNet.fold)."
        )


__all__ = ["MetaAlgorithm"]

"""MetaLearnerModule: meta-train a learner (the teacher) on episodes."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_metakd.algorithms import EpisodeLoss, Learner, MetaAlgorithm
from lightning_metakd.data import Episode
from lightning_metakd.modules.episodic import EpisodicModule


class MetaLearnerModule(EpisodicModule):
    """Meta-trains ``backbone`` with ``algorithm`` (MAML, ANIL, Meta-SGD, ProtoNet, MatchingNet).

    The training step is the outer loop of meta-learning: for each task of the episode the
    :class:`~lightning_metakd.algorithms.Learner` adapts on the support set (the inner loop, in
    :mod:`lightning_metakd.algorithms`) and predicts the query set, and the mean query loss updates
    the initial parameters θ — after training, θ* — that distillation later transfers to a
    student. The trained learner is :attr:`learner`; a checkpoint of this module rebuilds it on its
    own (:func:`~lightning_metakd.modules.checkpoint.load_learner`).

    Args:
        backbone: a feature extractor with a ``num_features`` attribute (``Conv4``, ``ResNet12``, ...).
        algorithm: a :class:`~lightning_metakd.algorithms.MetaAlgorithm`.
        ways: classes per task; sizes the linear head of MAML-family algorithms.
        normalization: the BatchNorm policy of training and evaluation episodes:
            ``"transductive"`` (each batch its own statistics, the papers' protocol),
            ``"support"`` (the support set's statistics normalise every query) or
            ``"population"`` (meta-training statistics, estimated at every validation and test);
            see :data:`~lightning_metakd.algorithms.POLICIES`. Recorded in the checkpoint.
        vmap_tasks: process a meta-batch's tasks with ``torch.func.vmap`` (``True``) or a loop
            (``False``); ``None`` picks per device (loop on CPU, vmap on GPU).
        task_chunk_size: tasks whose graphs live together in a training step (and, with vmap, tasks
            per vectorised chunk). ``None``: one task at a time on the loop path, the whole
            meta-batch with vmap. Gradients are the same for every value; memory is not.
        optimizer, lr_scheduler, allow_tf32, tune_cpu_allocator: see
            :class:`~lightning_metakd.modules.episodic.EpisodicModule`.

    Example::

        module = MetaLearnerModule(Conv4(hidden=64), MAML(inner_lr=0.4), ways=5)
        L.Trainer(max_epochs=10).fit(module, KanjiDataModule(ways=5, meta_batch_size=8))
        state = module.learner.adapt(support_x, support_y)
        predicted = module.learner.predict(state, query_x).argmax(-1)
    """

    checkpoint_kind = "learner"

    def __init__(
        self,
        backbone: nn.Module,
        algorithm: MetaAlgorithm,
        ways: int = 5,
        normalization: str = "transductive",
        vmap_tasks: bool | None = None,
        task_chunk_size: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        allow_tf32: bool = False,
        tune_cpu_allocator: bool = True,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, allow_tf32, tune_cpu_allocator)
        self.save_hyperparameters(ignore=["backbone", "algorithm", "optimizer", "lr_scheduler"])
        self.learner = Learner(
            backbone, algorithm, ways, normalization, vmap_tasks, task_chunk_size
        )

    def episode_loss(self, batch: Episode, training: bool = True) -> EpisodeLoss:
        """``mean_t L_task(f_{θ'_t}(query_x_t), query_y_t)``: :meth:`Learner.episode_loss
        <lightning_metakd.algorithms.Learner.episode_loss>`."""
        return self.learner.episode_loss(batch, training)

    def components(self) -> dict[str, Any]:
        return {
            "kind": self.checkpoint_kind,
            "module": f"{type(self).__module__}.{type(self).__qualname__}",
            "learner": self.learner.components(),
        }


__all__ = ["MetaLearnerModule"]

"""EpisodicModule: what every episodic LightningModule here shares, written once.

A subclass says two things: which :class:`~lightning_metakd.algorithms.Learner` is trained and
evaluated (:attr:`EpisodicModule.learner`) and what the loss of an episode is
(:meth:`EpisodicModule.episode_loss`). This base class owns the rest: the training step
(memory-bounded chunks of tasks, logging every named term), validation, test and predict
(the learner adapts and is scored, exact under DDP), optimisers, the checks and process settings
of ``setup``, and the checkpoint's description of its components.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_metakd.algorithms import EpisodeLoss, Learner, memory_bounded_loss, use_vmap
from lightning_metakd.data import Episode
from lightning_metakd.evaluation import EpisodicAccuracy
from lightning_metakd.modules.allocator import configure_cpu_allocator
from lightning_metakd.modules.checkpoint import FORMAT_VERSION, read_checkpoint, upgrade_checkpoint
from lightning_metakd.modules.distributed import destroy_process_group_at_exit
from lightning_metakd.modules.finite import check_finite_loss
from lightning_metakd.modules.precision import configure_tf32


def chunked_loss(
    batch: Episode,
    chunk_size: int,
    chunk_loss: Callable[[Episode], Tensor],
    parameters: Sequence[Tensor] | Iterator[Tensor],
) -> Tensor:
    """``Σ_c (T_c / T) · chunk_loss(c)`` over chunks of at most ``chunk_size`` tasks of ``batch``.

    The meta-batch's mean loss, computed with the graphs of one chunk alive at a time
    (:func:`~lightning_metakd.algorithms.memory_bounded_loss`); ``backward`` on the result gives
    the gradients of the whole meta-batch with respect to ``parameters``. A single chunk returns
    its loss as is.
    """
    chunks = batch.split(chunk_size)
    losses = (chunk_loss(chunk) * (chunk.num_tasks / batch.num_tasks) for chunk in chunks)
    if len(chunks) == 1:
        return next(losses)
    return memory_bounded_loss(losses, list(parameters))


class EpisodicModule(L.LightningModule):
    """Base class: meta-train a learner on episodes with a loss the subclass defines.

    Validation and test adapt too, so they need gradients: the learner turns inference mode off
    around evaluation itself and keeps no graph, so this works with any ``Trainer`` and memory does
    not grow across evaluations. Metrics: ``train/loss``, ``train/acc``, ``train/loss_<term>`` for
    each named term of the loss, ``{val,test}/acc``, ``{val,test}/acc_ci95``, ``{val,test}/loss``.

    Args:
        optimizer: the outer optimiser, a callable on parameters (LightningCLI: ``class_path``).
        lr_scheduler: optional scheduler callable on the optimiser.
        allow_tf32: keep PyTorch's TF32 settings on CUDA; by default a gradient-based inner loop
            turns TF32 off there (:func:`~lightning_metakd.modules.precision.configure_tf32`).
        tune_cpu_allocator: on a CPU run, ``setup`` tunes glibc malloc for this workload
            (:func:`~lightning_metakd.modules.allocator.tune_cpu_allocator`); ``False`` keeps
            the defaults.
    """

    #: Set by the subclass: the learner that is trained and evaluated.
    learner: Learner
    #: The kind of checkpoint this module writes (:mod:`lightning_metakd.modules.checkpoint`).
    checkpoint_kind: str = ""

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        allow_tf32: bool = False,
        tune_cpu_allocator: bool = True,
    ) -> None:
        super().__init__()
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.allow_tf32, self.tune_cpu_allocator = allow_tf32, tune_cpu_allocator
        # Weighted by tasks: Lightning's `self.log(batch_size=n, sync_dist=True)` averages the
        # ranks' integer episode counts with truncation (5 episodes over 2 ranks count as 4).
        self.metrics = nn.ModuleDict(
            {
                split: nn.ModuleDict({"acc": EpisodicAccuracy(), "loss": MeanMetric()})
                for split in ("val", "test")
            }
        )

    # -- what a subclass defines ------------------------------------------------------------------
    def episode_loss(self, batch: Episode, training: bool = True) -> EpisodeLoss:
        """The objective of an episode, its named terms, and the learner's accuracy and logits."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Build what depends on files or other learners (e.g. load teachers); idempotent."""

    def check_data(self, stage: str) -> None:
        """Raise a clear error in ``setup`` when the trainer's data cannot feed the learners."""
        data = getattr(self._trainer, "datamodule", None)
        if data is None:
            return
        settings = ["ways"] if stage == "fit" else []
        if stage != "fit" or self.trainer.limit_val_batches != 0:
            settings.append("test_ways")
        self.learner.check_data(data, stage, self.learner_name, tuple(settings))

    #: How the evaluated learner is named in messages.
    learner_name = "learner"

    def components(self) -> dict[str, Any]:
        """What rebuilds this module's learners and parts from a checkpoint (plain values only)."""
        raise NotImplementedError

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()
        self.prepare()
        trainer = self._trainer
        if trainer is not None and use_vmap(self.learner.vmap_tasks, trainer.strategy.root_device):
            self.learner.algorithm.check_vmap()  # vmap is the default off CPU
        self.check_data(stage)
        configure_tf32(trainer, self.learner.algorithm, self.allow_tf32)
        configure_cpu_allocator(trainer, self.tune_cpu_allocator)

    def training_chunk_size(self, batch: Episode) -> int:
        """Tasks whose graphs are alive together in a training step.

        The learner's ``task_chunk_size`` if set; otherwise 1 task on the loop path (the default
        on CPU: the peak memory of one task, like learn2learn) and the whole meta-batch with vmap.
        """
        if self.learner.task_chunk_size is not None:
            return self.learner.task_chunk_size
        vmap = use_vmap(self.learner.vmap_tasks, batch.support_x.device)
        return batch.num_tasks if vmap else 1

    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        accuracies: list[Tensor] = []
        terms: dict[str, Tensor] = {}

        def chunk_loss(chunk: Episode) -> Tensor:
            out = self.episode_loss(chunk, training=True)
            accuracies.append(out.accuracy.detach())
            for name, value in out.terms.items():
                share = value.detach() * (chunk.num_tasks / batch.num_tasks)
                terms[name] = terms[name] + share if name in terms else share
            return out.loss

        loss = chunked_loss(batch, self.training_chunk_size(batch), chunk_loss, self.parameters())
        n = batch.num_tasks
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, batch_size=n, sync_dist=True)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log(
            "train/acc", torch.cat(accuracies).mean(), prog_bar=True, batch_size=n, sync_dist=True
        )
        check_finite_loss(self, batch_idx, loss, terms)
        return loss

    def _evaluation_step(self, batch: Episode, split: str) -> None:
        out = self.learner.evaluate(batch)
        self.metrics[split]["acc"].update(out.accuracy)
        self.metrics[split]["loss"].update(out.loss.detach(), weight=batch.num_tasks)

    def _log_evaluation(self, split: str) -> None:
        mean, ci95 = self.metrics[split]["acc"].compute().tolist()
        loss = self.metrics[split]["loss"].compute()
        self.metrics[split]["acc"].reset()
        self.metrics[split]["loss"].reset()
        # Already reduced over all DDP ranks; sync_dist averages identical values (and no warning).
        self.log(f"{split}/acc", mean, prog_bar=True, sync_dist=True)
        self.log(f"{split}/acc_ci95", ci95, sync_dist=True)
        self.log(f"{split}/loss", loss, sync_dist=True)

    def calibrate(self) -> None:
        """Estimate the population BatchNorm statistics of a ``"population"`` learner from fixed
        meta-training tasks of the trainer's data (:meth:`EpisodicDataModule.calibration_images
        <lightning_metakd.data.EpisodicDataModule.calibration_images>`); a no-op otherwise."""
        if self.learner.normalization != "population":
            return
        data = getattr(self._trainer, "datamodule", None)
        if data is None or not hasattr(data, "calibration_images"):
            if bool(getattr(self.learner, "calibrated", False)):
                return  # a checkpoint's statistics
            raise ValueError(
                "normalization='population' estimates BatchNorm statistics from meta-training "
                "images, but this run has no EpisodicDataModule; pass one, or calibrate the "
                "learner yourself (learner.calibrate(images))."
            )
        self.learner.calibrate(x.to(self.device) for x in data.calibration_images())

    def on_validation_epoch_start(self) -> None:
        self.calibrate()

    def on_test_epoch_start(self) -> None:
        self.calibrate()

    def on_predict_epoch_start(self) -> None:
        self.calibrate()

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def predict_step(self, batch: Episode, batch_idx: int) -> dict[str, Tensor]:
        """Adapt on each task's support set and label its queries (``metakd predict``).

        Returns ``predictions`` (task labels ``[T, N*Q]`` in ``0..N-1``) and ``classes`` (the
        split's class index behind each prediction, ``[T, N*Q]``).
        """
        predictions = self.learner.evaluate(batch).logits.argmax(-1)
        return {"predictions": predictions, "classes": batch.classes.gather(1, predictions)}

    def configure_optimizers(self) -> Any:
        self.prepare()  # parameters that depend on other learners (projectors) must exist first
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.prepare()
        checkpoint["metakd_components"] = self.components()
        checkpoint["metakd_format"] = FORMAT_VERSION

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_checkpoint(checkpoint)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any
    ) -> EpisodicModule:
        """Rebuild the module, every component included, from a checkpoint file alone."""
        checkpoint = read_checkpoint(checkpoint_path, expect=cls.checkpoint_kind or None)
        for name, value in checkpoint.module_arguments().items():
            kwargs.setdefault(name, value)
        return super().load_from_checkpoint(
            checkpoint.path, map_location=map_location, weights_only=True, **kwargs
        )


__all__ = ["EpisodicModule", "chunked_loss"]

"""MetaLearnerModule: meta-train a learner (the teacher) on episodes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_metakd.algorithms import MetaAlgorithm, memory_bounded_loss, prepare_model
from lightning_metakd.data import Episode
from lightning_metakd.evaluation import EpisodicAccuracy
from lightning_metakd.models.classifier import Classifier
from lightning_metakd.modules.allocator import configure_cpu_allocator
from lightning_metakd.modules.distributed import destroy_process_group_at_exit
from lightning_metakd.modules.finite import check_finite_loss
from lightning_metakd.modules.precision import configure_tf32
from lightning_metakd.modules.spec import build_component, component_spec


class MetaLoss(NamedTuple):
    """What :meth:`MetaLearnerModule.meta_loss` returns."""

    loss: Tensor  #: mean query cross-entropy over the batch's tasks (scalar)
    accuracy: Tensor  #: query accuracy of each task, ``[T]``
    logits: Tensor  #: query logits, ``[T, N*Q, N]``


def chunked_loss(
    batch: Episode,
    chunk_size: int,
    chunk_loss: Callable[[Episode], Tensor],
    parameters: Sequence[Tensor],
) -> Tensor:
    """``Σ_c (T_c / T) · chunk_loss(c)`` over chunks of at most ``chunk_size`` tasks of ``batch``.

    The meta-batch's mean loss, computed with the graphs of one chunk alive at a time
    (:func:`~lightning_metakd.algorithms.memory_bounded_loss`); ``backward`` on the result gives
    the gradients of the whole meta-batch with respect to ``parameters``. A single chunk returns
    its loss as is. Shared by the training steps of every module here.
    """
    chunks = batch.split(chunk_size)
    losses = (chunk_loss(chunk) * (chunk.num_tasks / batch.num_tasks) for chunk in chunks)
    if len(chunks) == 1:
        return next(losses)
    return memory_bounded_loss(losses, list(parameters))


def evaluation_metrics() -> nn.ModuleDict:
    """Per-split accumulators of evaluation accuracy (with CI) and loss, exact under DDP.

    The loss is a weighted ``MeanMetric`` rather than ``self.log(batch_size=n, sync_dist=True)``,
    whose mean averages the ranks' integer episode counts with truncation and is wrong when
    evaluation shards are uneven (5 episodes over 2 ranks count as 4).
    """
    return nn.ModuleDict(
        {
            split: nn.ModuleDict({"acc": EpisodicAccuracy(), "loss": MeanMetric()})
            for split in ("val", "test")
        }
    )


def update_evaluation(metrics: nn.ModuleDict, split: str, out: MetaLoss, num_tasks: int) -> None:
    """Add one evaluation batch's per-task accuracies and mean loss to ``metrics[split]``."""
    metrics[split]["acc"].update(out.accuracy)
    metrics[split]["loss"].update(out.loss.detach(), weight=num_tasks)


def log_evaluation(module: L.LightningModule, metrics: nn.ModuleDict, split: str) -> None:
    """Log ``{split}/acc``, ``{split}/acc_ci95`` and ``{split}/loss`` from ``module``; reset them."""
    mean, ci95 = metrics[split]["acc"].compute().tolist()
    loss = metrics[split]["loss"].compute()
    metrics[split]["acc"].reset()
    metrics[split]["loss"].reset()
    # Already reduced over all DDP ranks; sync_dist averages identical values (and no warning).
    module.log(f"{split}/acc", mean, prog_bar=True, sync_dist=True)
    module.log(f"{split}/acc_ci95", ci95, sync_dist=True)
    module.log(f"{split}/loss", loss, sync_dist=True)


def read_components(checkpoint_path: str | Path, owner: str, required: Sequence[str]) -> dict:
    """The ``metakd_components`` of a checkpoint file, with clear errors for anything else.

    ``owner`` names the module class in the messages; ``required`` lists the component names the
    checkpoint must hold. Loads with ``weights_only=True`` (no pickled code).
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    components = checkpoint.get("metakd_components", {}) if isinstance(checkpoint, dict) else {}
    if not components or not all(name in components for name in required):
        missing = " and ".join(required) or "lightning-metakd components"
        raise ValueError(
            f"{path} is not a {owner} checkpoint (it names no {missing})"
            f"; pass the checkpoint that `metakd fit` wrote for a {owner}."
        )
    return components


class MetaLearnerModule(L.LightningModule):
    """Meta-trains ``backbone`` with ``algorithm`` (MAML, ANIL, Meta-SGD, ProtoNet, MatchingNet).

    The training step is the outer loop of meta-learning: for each task of the episode the algorithm
    adapts on the support set (the inner loop, in :mod:`lightning_metakd.algorithms`), predicts the
    query set, and the mean query loss updates the initial parameters θ — after training, θ* — that
    the distillation stage later transfers to a student.

    Validation and test adapt too, so they need gradients: this module turns inference mode off
    around its evaluation steps itself and keeps no graph, so it works with any ``Trainer`` and
    memory does not grow across evaluations.

    Args:
        backbone: a feature extractor with a ``num_features`` attribute (``Conv4``, ``ResNet12``, ...).
        algorithm: a :class:`~lightning_metakd.algorithms.MetaAlgorithm`.
        ways: classes per task; sizes the linear head of MAML-family algorithms.
        vmap_tasks: process a meta-batch's tasks with ``torch.func.vmap`` (``True``) or a loop
            (``False``); ``None`` picks per device (loop on CPU, vmap on GPU).
        task_chunk_size: tasks whose graphs live together in a training step (and, with vmap, tasks
            per vectorised chunk). ``None``: one task at a time on the loop path, the whole
            meta-batch with vmap. Gradients are the same for every value; memory is not.
        optimizer: the outer optimizer, a callable on parameters (LightningCLI: ``class_path``).
        lr_scheduler: optional scheduler callable on the optimizer.
        allow_tf32: keep PyTorch's TF32 settings on CUDA. By default a gradient-based inner loop
            (MAML, ANIL, Meta-SGD) turns TF32 off there, since it ruins second-order
            meta-gradients (:func:`~lightning_metakd.modules.precision.configure_tf32`).
        tune_cpu_allocator: on a CPU run, ``setup`` raises glibc malloc's mmap and trim thresholds
            for the process so each task reuses the freed activation memory instead of
            page-faulting it in again (1.06-1.2x faster MAML steps;
            :func:`~lightning_metakd.modules.allocator.tune_cpu_allocator`). ``False`` keeps
            malloc's defaults. No effect on GPU runs or without glibc.

    Example — adapt a trained learner to a brand-new task in three lines::

        learner = MetaLearnerModule.load_from_checkpoint("teacher.ckpt")
        state = learner.adapt(support_x, support_y)        # [N*K, C, H, W], [N*K]
        predicted = learner.predict(state, query_x).argmax(-1)
    """

    def __init__(
        self,
        backbone: nn.Module,
        algorithm: MetaAlgorithm,
        ways: int = 5,
        vmap_tasks: bool | None = None,
        task_chunk_size: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        allow_tf32: bool = False,
        tune_cpu_allocator: bool = True,
    ) -> None:
        super().__init__()
        if ways < 2:
            raise ValueError(f"ways must be at least 2, got {ways}.")
        self.save_hyperparameters(ignore=["backbone", "algorithm", "optimizer", "lr_scheduler"])
        # Kept outside the hyper-parameters (LightningCLI re-parses those when resuming).
        self.components = {
            "backbone": component_spec(backbone),
            "algorithm": component_spec(algorithm),
        }
        self.backbone = prepare_model(backbone)
        self.algorithm = algorithm
        self.ways = ways
        self.model: nn.Module = (
            Classifier(self.backbone, ways) if algorithm.needs_head else self.backbone
        )
        self.algorithm.build(self.model)
        if vmap_tasks:
            algorithm.check_vmap()  # e.g. MAML(checkpoint_steps=True) needs the loop
        self.vmap_tasks, self.task_chunk_size = vmap_tasks, task_chunk_size
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.allow_tf32, self.tune_cpu_allocator = allow_tf32, tune_cpu_allocator
        self.metrics = evaluation_metrics()

    # -- the method -------------------------------------------------------------------------------
    def theta_star(self) -> dict[str, Tensor]:
        """The meta-learned initial parameters θ* of the adapted model (detached copies)."""
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def meta_loss(self, batch: Episode, training: bool = True) -> MetaLoss:
        """Mean query loss and per-task accuracy of an episode, after adaptation on its support sets.

        This is the single entry point of training, evaluation and users' own loops:
        ``L = mean_t L_task(f_{θ'_t}(query_x_t), query_y_t)`` with ``θ'_t`` adapted on task ``t``'s
        support set (for metric-based algorithms, ``θ'_t`` is θ and the support set defines the
        classifier).
        """
        self._check_episode(batch)
        params = dict(self.model.named_parameters())
        logits = self.algorithm.episode_logits(
            self.model,
            params,
            batch.support_x,
            batch.support_y,
            batch.query_x,
            batch.ways,
            training,
            vmap_tasks=self.vmap_tasks,
            chunk_size=self.task_chunk_size,
        )
        # Half-precision logits are scored in float32; float64 stays float64.
        scored = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        loss = F.cross_entropy(scored.flatten(0, 1), batch.query_y.flatten())
        accuracy = (logits.argmax(-1) == batch.query_y).float().mean(1)
        return MetaLoss(loss, accuracy, logits)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Any:
        """Adapt to one task's support set ``[N*K, C, H, W]``, ``[N*K]``; returns the task state."""
        ways = int(support_y.max()) + 1
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        with torch.inference_mode(False), torch.no_grad():
            support_x, support_y = support_x.clone(), support_y.clone()
            return self.algorithm.adapt(
                self.model, params, support_x, support_y, ways, training=False
            )

    def predict(self, state: Any, query_x: Tensor) -> Tensor:
        """Logits ``[M, N]`` for query images ``[M, C, H, W]`` of the task behind ``state``."""
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        with torch.inference_mode(False), torch.no_grad():
            return self.algorithm.logits(self.model, params, state, query_x.clone(), self.ways)

    # -- Lightning hooks --------------------------------------------------------------------------
    def training_chunk_size(self, batch: Episode) -> int:
        """Tasks whose graphs are alive together in a training step.

        ``task_chunk_size`` if set; otherwise 1 task on the loop path (the default on CPU: peak
        memory of one task, like learn2learn) and the whole meta-batch with vmap.
        """
        if self.task_chunk_size is not None:
            return self.task_chunk_size
        vmap = (
            self.vmap_tasks if self.vmap_tasks is not None else batch.support_x.device.type != "cpu"
        )
        return batch.num_tasks if vmap else 1

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()
        trainer = self._trainer
        if self.vmap_tasks is None and trainer and trainer.strategy.root_device.type != "cpu":
            self.algorithm.check_vmap()  # vmap is the default off CPU
        self.check_data(self._trainer, stage)
        configure_tf32(trainer, self.algorithm, self.allow_tf32)
        configure_cpu_allocator(trainer, self.tune_cpu_allocator)

    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        accuracies: list[Tensor] = []

        def chunk_loss(chunk: Episode) -> Tensor:
            out = self.meta_loss(chunk, training=True)
            accuracies.append(out.accuracy.detach())
            return out.loss

        loss = chunked_loss(batch, self.training_chunk_size(batch), chunk_loss, self.parameters())
        n = batch.num_tasks
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log(
            "train/acc", torch.cat(accuracies).mean(), prog_bar=True, batch_size=n, sync_dist=True
        )
        check_finite_loss(self, batch_idx, loss)
        return loss

    def evaluate(self, batch: Episode) -> MetaLoss:
        """:meth:`meta_loss` in evaluation (``inner_steps_test``), usable anywhere, no graph kept.

        Adaptation needs gradients even when the caller runs in inference mode (a ``Trainer``'s
        evaluation loop); tensors made there are cloned so autograd may use them.
        """
        with torch.inference_mode(False), torch.no_grad():
            batch = Episode(*(t.clone() for t in (batch.support_x, batch.support_y, batch.query_x,
                                                 batch.query_y, batch.classes)))  # fmt: skip
            return self.meta_loss(batch, training=False)

    def _evaluation_step(self, batch: Episode, split: str) -> None:
        update_evaluation(self.metrics, split, self.evaluate(batch), batch.num_tasks)

    def predict_step(self, batch: Episode, batch_idx: int) -> dict[str, Tensor]:
        """Adapt on each task's support set and label its queries (``metakd predict``).

        Returns ``predictions`` (task labels ``[T, N*Q]`` in ``0..N-1``) and ``classes`` (the
        split's class index behind each prediction, ``[T, N*Q]``).
        """
        predictions = self.evaluate(batch).logits.argmax(-1)
        return {"predictions": predictions, "classes": batch.classes.gather(1, predictions)}

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        log_evaluation(self, self.metrics, "val")

    def on_test_epoch_end(self) -> None:
        log_evaluation(self, self.metrics, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # -- checks and checkpoints -------------------------------------------------------------------
    def check_data(
        self,
        trainer: L.Trainer | None,
        stage: str,
        who: str = "learner",
        training_only: bool = False,
    ) -> None:
        """Fail at ``setup``, before any step, when ``trainer``'s data module cannot fit this learner.

        Compares a MAML-family head with the data's ``ways`` (training) and ``test_ways``
        (validation, test, predict), and the backbone's ``image_size`` and ``in_channels`` with the
        data's — the checks every episode gets later, made once with the data's setting names.
        ``who`` names the learner in messages; ``training_only`` checks ``fit`` alone, and not
        ``test_ways`` (a distillation teacher sees training episodes only). Data modules without
        these attributes (and calls without a trainer) pass.
        """
        data = getattr(trainer, "datamodule", None)
        if data is None or (training_only and stage != "fit"):
            return
        settings = ["ways"] if stage == "fit" else []
        if not training_only and (stage != "fit" or trainer.limit_val_batches != 0):
            settings.append("test_ways")
        for setting in settings:
            ways = getattr(data, setting, None)
            if self.algorithm.needs_head and isinstance(ways, int) and ways != self.ways:
                raise ValueError(
                    f"The {who}'s {type(self.algorithm).__name__} head is {self.ways}-way but the "
                    f"data module has {setting}={ways}; set the data's {setting} to {self.ways}, or "
                    f"use a {who} built with ways={ways}."
                )
        size = getattr(self.backbone, "image_size", None)
        data_size = getattr(data, "image_size", None)
        if isinstance(size, int) and isinstance(data_size, int) and size != data_size:
            raise ValueError(
                f"The {who}'s backbone was built for {size}x{size} images but the data module has "
                f"image_size={data_size}; set the data's image_size to {size}, or use a {who} "
                f"built with image_size={data_size}."
            )
        channels = getattr(self.backbone, "in_channels", None)
        data_channels = data.channels if getattr(data, "splits", None) else None
        if (
            isinstance(channels, int)
            and isinstance(data_channels, int)
            and channels != data_channels
        ):
            raise ValueError(
                f"The {who}'s backbone expects {channels}-channel images but the data has "
                f"{data_channels}; set the backbone's in_channels to {data_channels}, or use a "
                f"{who} built for {data_channels}-channel images."
            )

    def _check_episode(self, batch: Episode) -> None:
        if self.algorithm.needs_head and batch.ways != self.ways:
            raise ValueError(
                f"This {type(self.algorithm).__name__} learner has a {self.ways}-way head but the "
                f"episode is {batch.ways}-way; set the data's (test_)ways to {self.ways} or build "
                f"the learner with ways={batch.ways}."
            )
        expected = getattr(self.backbone, "in_channels", None)
        if expected is not None and batch.support_x.shape[2] != expected:
            raise ValueError(
                f"The backbone expects {expected}-channel images but the episode has "
                f"{batch.support_x.shape[2]}; set the backbone's in_channels to match the data."
            )
        size = getattr(self.backbone, "image_size", None)
        if size is not None and tuple(batch.support_x.shape[-2:]) != (size, size):
            raise ValueError(
                f"The backbone was built for {size}x{size} images but the episode has "
                f"{tuple(batch.support_x.shape[-2:])}; set the backbone's image_size and the data's "
                "image_size to the same value."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["metakd_components"] = self.components

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any
    ) -> MetaLearnerModule:
        """Rebuild a learner, backbone and algorithm included, from a checkpoint file alone."""
        path = Path(checkpoint_path)
        components = read_components(path, cls.__name__, ("backbone", "algorithm"))
        kwargs.setdefault("backbone", build_component(components["backbone"]))
        kwargs.setdefault("algorithm", build_component(components["algorithm"]))
        return super().load_from_checkpoint(
            path, map_location=map_location, weights_only=True, **kwargs
        )

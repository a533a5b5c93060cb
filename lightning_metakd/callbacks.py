"""Callbacks: a checkpoint that keeps the best and the latest state, and TensorBoard views.

:class:`BestAndLastCheckpoint` is the ``metakd`` command's checkpoint (its ``--checkpoint.*``
options): ``best.ckpt`` on the best ``val/acc`` and a ``last.ckpt`` that really is the latest.

Three Lightning :class:`~lightning.pytorch.callbacks.Callback` s that the ``metakd`` command turns on
by default (``TRAINER_DEFAULTS`` in :mod:`lightning_metakd.cli`); each does nothing unless the run
logs to a :class:`~lightning.pytorch.loggers.TensorBoardLogger`, and only the global-zero process
writes.

- :class:`EpisodeImages`: one training episode as an image (``episode/train``), once, when fit
  starts: a row per class, its support images, a gap, then its query images.
- :class:`AttentionMaps`: for a :class:`~lightning_metakd.modules.DistillationModule` whose teacher
  and student are :class:`~lightning_metakd.models.VisionTransformer` s, the teacher's and the
  student's class-token attention on query images of one validation episode, side by side
  (``attention/teacher_vs_student``), after every validation epoch.
- :class:`HyperparameterMetrics`: the run's hyperparameters (module, its components, data) with
  its final metrics ``hp/test_acc``, ``hp/test_acc_ci95``, ``hp/test_loss`` and ``hp/val_acc``
  (the best validation accuracy) in TensorBoard's HPARAMS tab, when a test ends.

Open the logs with ``tensorboard --logdir runs``.

Example::

    trainer = L.Trainer(logger=TensorBoardLogger("runs"),
                        callbacks=[EpisodeImages(), AttentionMaps(), HyperparameterMetrics()])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_metakd.data import Episode, EpisodicDataModule
from lightning_metakd.models import VisionTransformer
from lightning_metakd.spec import component_spec


def tensorboard_experiment(trainer: L.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger on global rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _to_rgb(images: Tensor) -> Tensor:
    """``[B, C, H, W]`` → ``[B, 3, H, W]`` in ``[0, 1]``, each image min-max scaled on its own."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != 3:
        images = images[:, :1].expand(-1, 3, -1, -1)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(1e-8)


def episode_grid(
    support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, max_queries: int = 5
) -> Tensor:
    """One task as an image ``[3, H', W']``: per class, its support images, a blank, its queries.

    Args:
        support_x, support_y: ``[N*K, C, H, W]`` and ``[N*K]`` of one task.
        query_x, query_y: ``[N*Q, C, H, W]`` and ``[N*Q]``; at most ``max_queries`` per class shown.

    Example:
        >>> grid = episode_grid(torch.rand(5, 1, 28, 28), torch.arange(5),
        ...                     torch.rand(10, 1, 28, 28), torch.arange(5).repeat_interleave(2))
        >>> grid.shape  # 5 rows of 1 support + 1 blank + 2 queries, 2 px padding
        torch.Size([3, 152, 122])
    """
    from torchvision.utils import make_grid

    ways = int(support_y.max()) + 1
    support, query = _to_rgb(support_x), _to_rgb(query_x)
    shots = max(int((support_y == c).sum()) for c in range(ways))
    queries = min(max_queries, max(int((query_y == c).sum()) for c in range(ways)))
    blank = torch.zeros_like(support[0])
    tiles = []
    for c in range(ways):
        row_s = list(support[support_y == c])
        row_q = list(query[query_y == c][:queries])
        tiles += row_s + [blank] * (shots - len(row_s)) + [blank]
        tiles += row_q + [blank] * (queries - len(row_q))
    return make_grid(torch.stack(tiles), nrow=shots + 1 + queries, padding=2, pad_value=0.5)


class BestAndLastCheckpoint(ModelCheckpoint):
    """A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose ``last.ckpt`` is always the latest.

    With a ``monitor`` and ``save_last=True``, Lightning 2.6 rewrites ``last.ckpt`` only when it also
    saves a new top-k checkpoint, so after an epoch that does not improve ``val/acc`` the "last"
    checkpoint is an older one, and resuming a killed run from it silently repeats epochs. This
    subclass also writes ``last.ckpt`` after every validation (or training epoch end) at which
    nothing was saved. The options are ``ModelCheckpoint``'s.

    Example::

        trainer = L.Trainer(callbacks=[BestAndLastCheckpoint(monitor="val/acc", mode="max",
                                                             filename="best", save_last=True)])
    """

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        if (
            self.save_last is True
            and not self._should_skip_saving_checkpoint(trainer)
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)


class EpisodeImages(Callback):
    """Logs one training episode as an image (``episode/train``) once, when fit starts.

    Each row of the grid is one class of the task: its ``shots`` support images, a blank tile, then
    up to ``max_queries`` of its query images — what the learner adapts on and what it must then
    classify. Needs an :class:`~lightning_metakd.data.EpisodicDataModule`; the task is the first
    of the training sampler's epoch-0 list (drawn from its own seeded generator, so training sees
    the same episodes with or without this callback).

    Args:
        max_queries: query images shown per class.
        tag: the TensorBoard image tag.
    """

    def __init__(self, max_queries: int = 5, tag: str = "episode/train") -> None:
        if max_queries < 1:
            raise ValueError(f"max_queries must be at least 1, got {max_queries}.")
        self.max_queries, self.tag = max_queries, tag

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_experiment(trainer)
        datamodule = trainer.datamodule
        if writer is None or not isinstance(datamodule, EpisodicDataModule):
            return
        spec = next(iter(datamodule.sampler("train")))
        support_x, support_y, query_x, query_y, _ = datamodule.splits["train"][spec]
        grid = episode_grid(support_x, support_y, query_x, query_y, self.max_queries)
        writer.add_image(self.tag, grid, global_step=trainer.global_step)


def class_token_attention(backbone: VisionTransformer, images: Tensor, layer: int = -1) -> Tensor:
    """Where the class token looks: ``[B, g, g]`` attention over the ``g x g`` patch grid.

    Row 0 of block ``layer``'s attention probabilities (Dosovitskiy et al. 2021), averaged over
    heads, without the class token's attention to itself, reshaped to the patch grid.

    Example:
        >>> vit = VisionTransformer(image_size=28, patch_size=7, embed_dim=16, depth=2, heads=2)
        >>> class_token_attention(vit, torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 4, 4])
    """
    with torch.no_grad():
        _, attentions = backbone(images, return_attention=True)
    row = attentions[layer][:, :, 0, 1:].mean(1)  # [B, patches]
    side = backbone.image_size // backbone.patch_size
    return row.reshape(-1, side, side)


def _vit(learner: Any) -> VisionTransformer | None:
    backbone = getattr(learner, "backbone", None)
    return backbone if isinstance(backbone, VisionTransformer) else None


class AttentionMaps(Callback):
    """Teacher's and student's attention maps side by side, on one validation episode.

    For a :class:`~lightning_metakd.modules.DistillationModule` whose teacher and student backbones
    are both :class:`~lightning_metakd.models.VisionTransformer` s (attention distillation,
    ``L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²``), logs after every validation epoch an image
    ``attention/teacher_vs_student``: one row per query image of the first validation task — the
    image, the teacher's class-token attention and the student's (:func:`class_token_attention`
    of block ``layer``, upsampled to the image size). The maps come from the meta-learned initial
    parameters θ (the network a metric-based learner classifies with). Other modules: no-op.

    Args:
        images: query images shown (rows).
        layer: which block's attention (``-1``: the last one of each network).
        tag: the TensorBoard image tag.
    """

    def __init__(self, images: int = 4, layer: int = -1, tag: str = "attention/teacher_vs_student"):
        if images < 1:
            raise ValueError(f"images must be at least 1, got {images}.")
        self.images, self.layer, self.tag = images, layer, tag
        self._query: Tensor | None = None

    def _backbones(self, pl_module: L.LightningModule) -> tuple[Any, Any] | None:
        teachers = getattr(pl_module, "teachers", None)
        student = getattr(pl_module, "student", None)
        t, s = _vit(teachers[0] if teachers else None), _vit(student)
        return (t, s) if t is not None and s is not None else None

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, Episode):
            self._query = batch.query_x[0, : self.images].detach()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        query, self._query = self._query, None
        if query is None or trainer.sanity_checking:
            return
        writer = tensorboard_experiment(trainer)
        backbones = self._backbones(pl_module)
        if writer is None or backbones is None:
            return
        rows = [_to_rgb(query)]
        for backbone in backbones:
            maps = class_token_attention(backbone, query.to(pl_module.device), self.layer)
            maps = F.interpolate(maps[:, None].float(), size=query.shape[-2:], mode="nearest")
            rows.append(_to_rgb(maps))
        tiles = torch.stack(rows, dim=1).flatten(0, 1)  # image, teacher, student per query
        from torchvision.utils import make_grid

        grid = make_grid(tiles, nrow=3, padding=2, pad_value=0.5)
        writer.add_image(self.tag, grid, global_step=trainer.global_step)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}" if prefix else str(key), item, out)
    elif isinstance(value, bool | int | float | str) or value is None:
        out[prefix] = "None" if value is None else value
    elif isinstance(value, list | tuple):
        out[prefix] = str(list(value))
    else:
        out[prefix] = type(value).__name__


def run_hyperparameters(pl_module: L.LightningModule, datamodule: Any = None) -> dict[str, Any]:
    """Flat ``{name: value}`` of a module's hyperparameters, its components and its data.

    Keys: ``model/<hparam>``, ``model/<component>/class_path`` and ``.../init_args/<arg>`` (the
    learner's backbone and algorithm specs — ``model/backbone/...`` for a
    :class:`~lightning_metakd.modules.MetaLearnerModule`, ``model/student_backbone/...`` for a
    distiller — and a distiller's ``model/terms/<i>/...``), ``data/<hparam>``; values are
    numbers, booleans or strings.
    """
    out: dict[str, Any] = {}
    _flatten("model", dict(pl_module.hparams), out)
    learner = getattr(pl_module, "learner", None)
    if learner is not None and hasattr(learner, "components"):
        prefix = "student_" if getattr(pl_module, "learner_name", "") == "student" else ""
        specs = {f"{prefix}{k}": v for k, v in learner.components().items() if k != "ways"}
        _flatten("model", specs, out)
    terms = getattr(pl_module, "terms", None)
    if terms:
        _flatten("model", {"terms": {str(i): component_spec(t) for i, t in enumerate(terms)}}, out)
    if datamodule is not None and hasattr(datamodule, "hparams"):
        _flatten("data", dict(datamodule.hparams), out)
    return out


class HyperparameterMetrics(Callback):
    """Logs hyperparameters with the run's final metrics to TensorBoard's HPARAMS tab.

    When a test ends, writes the flat hyperparameters of :func:`run_hyperparameters` with
    ``hp/test_acc``, ``hp/test_acc_ci95``, ``hp/test_loss`` (from the test) and ``hp/val_acc``
    (the checkpoint callback's best ``val/acc``, when it monitors it), so runs can be sorted and
    compared by accuracy in one table. Use loggers built with ``default_hp_metric=False`` (the
    ``metakd`` default) so that no placeholder ``hp_metric`` is written at the start.
    """

    #: ``hp/<name>`` ← ``test/<name>``.
    TEST_METRICS = ("acc", "acc_ci95", "loss")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        metrics: dict[str, float] = {}
        for name in self.TEST_METRICS:
            value = trainer.callback_metrics.get(f"test/{name}")
            if value is not None:
                metrics[f"hp/test_{name}"] = float(value)
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_score", None)
        if best is not None and getattr(checkpoint, "monitor", None) == "val/acc":
            metrics["hp/val_acc"] = float(best)
        if not metrics:
            return
        params = run_hyperparameters(pl_module, trainer.datamodule)
        for logger in loggers:
            logger.log_hyperparams(params, metrics)


__all__ = [
    "BestAndLastCheckpoint",
    "AttentionMaps",
    "EpisodeImages",
    "HyperparameterMetrics",
    "class_token_attention",
    "episode_grid",
    "run_hyperparameters",
    "tensorboard_experiment",
]

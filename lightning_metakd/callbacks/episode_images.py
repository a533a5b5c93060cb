"""One training episode as an image in TensorBoard (``episode/train``)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_metakd.callbacks.tensorboard import episode_grid, tensorboard_experiment
from lightning_metakd.data import EpisodicDataModule


class EpisodeImages(Callback):
    """Logs one training episode as an image (``episode/train``) once, when fit starts.

    Each row of the picture is one class of the task (labelled ``class c``): its ``shots`` support
    images under the column title ``support``, a gap, then up to ``max_queries`` of its query images
    under ``queries`` — what the learner adapts on and what it must then classify; the title gives
    the setting (:func:`~lightning_metakd.callbacks.tensorboard.episode_grid`). Needs an
    :class:`~lightning_metakd.data.EpisodicDataModule`; the task is the first of the training
    sampler's epoch-0 list (drawn from its own seeded generator, so training sees the same
    episodes with or without this callback).

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
        support_x, support_y, query_x, query_y, *_ = datamodule.splits["train"][spec]
        picture = episode_grid(support_x, support_y, query_x, query_y, self.max_queries)
        writer.add_image(self.tag, picture.image, global_step=trainer.global_step)


__all__ = ["EpisodeImages"]

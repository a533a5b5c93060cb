"""Callbacks: a checkpoint that keeps the best and the latest state, and TensorBoard views.

:class:`BestAndLastCheckpoint` is the ``metakd`` command's checkpoint (its ``--checkpoint.*``
options): ``best.ckpt`` on the best ``val/acc`` and a ``last.ckpt`` that really is the latest.

Three Lightning :class:`~lightning.pytorch.callbacks.Callback` s that the ``metakd`` command turns
on by default (``TRAINER_DEFAULTS`` in :mod:`lightning_metakd.lightning_cli`); each does nothing
unless the run logs to a :class:`~lightning.pytorch.loggers.TensorBoardLogger`, and only the
global-zero process writes.

- :class:`EpisodeImages`: one training episode as an image (``episode/train``), once, when fit
  starts: a row per class (``class c``), its support images under ``support``, a gap, then its
  query images under ``queries``, the setting as the title.
- :class:`AttentionMaps`: for a :class:`~lightning_metakd.modules.DistillationModule` whose teacher
  and student are :class:`~lightning_metakd.models.VisionTransformer` s, the teacher's and the
  student's class-token attention on query images of one validation episode, side by side under
  the titles ``image``, ``teacher (block k of n)``, ``student (block k of n)``
  (``attention/teacher_vs_student``), after every validation epoch.
- :class:`HyperparameterMetrics`: the run's hyperparameters (module, its components, data) with
  its final metrics ``hp/test_acc``, ``hp/test_acc_ci95``, ``hp/test_loss`` and ``hp/val_acc``
  (the best validation accuracy) in TensorBoard's HPARAMS tab, when a test ends.

Open the logs with ``tensorboard --logdir runs`` (what each picture shows: ``docs/tensorboard.md``).
Both pictures are drawn by :func:`labelled_grid`, at a size that reads at 100% zoom.

Example::

    trainer = L.Trainer(logger=TensorBoardLogger("runs"),
                        callbacks=[EpisodeImages(), AttentionMaps(), HyperparameterMetrics()])
"""

from lightning_metakd.callbacks.attention_maps import (
    AttentionMaps,
    attention_grid,
    class_token_attention,
)
from lightning_metakd.callbacks.checkpoint import BestAndLastCheckpoint
from lightning_metakd.callbacks.episode_images import EpisodeImages
from lightning_metakd.callbacks.hyperparameters import HyperparameterMetrics, run_hyperparameters
from lightning_metakd.callbacks.tensorboard import (
    Picture,
    episode_grid,
    labelled_grid,
    tensorboard_experiment,
)

__all__ = [
    "BestAndLastCheckpoint",
    "AttentionMaps",
    "EpisodeImages",
    "HyperparameterMetrics",
    "Picture",
    "attention_grid",
    "class_token_attention",
    "episode_grid",
    "labelled_grid",
    "run_hyperparameters",
    "tensorboard_experiment",
]

"""The ``metakd`` command's checkpoint: ``best.ckpt`` on the best ``val/acc`` and a real ``last.ckpt``."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLastCheckpoint(ModelCheckpoint):
    """A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose ``last.ckpt`` is always the latest.

    Three differences from Lightning 2.6's, all about resuming a killed run without losing work:

    - With a ``monitor`` and ``save_last=True``, Lightning rewrites ``last.ckpt`` only when it also
      saves a new top-k checkpoint, so after an epoch that does not improve ``val/acc`` the "last"
      checkpoint is an older one, and resuming from it silently repeats epochs. This subclass also
      writes ``last.ckpt`` after every validation (or training epoch end) at which nothing was
      saved.
    - ``every_n_train_steps=N`` (mid-epoch checkpoints) writes ``last.ckpt`` every ``N`` steps,
      while ``best.ckpt`` is still chosen at validation. Lightning's own triggers are exclusive:
      with ``every_n_train_steps`` it stops saving top-k checkpoints at validation and saves them
      at the next ``N``-th step instead, with weights trained past the validated ones, and the
      score of the last epoch never gets its checkpoint.
    - A run resumed with the checkpoint folder spelt differently (relative or absolute, through a
      symbolic link) keeps its ``best_model_score``, ``best_k_models`` and ``last_model_path``;
      Lightning compares the folder names as strings and drops them.

    The options are ``ModelCheckpoint``'s.

    Example::

        trainer = L.Trainer(callbacks=[BestAndLastCheckpoint(monitor="val/acc", mode="max",
                                                             filename="best", save_last=True,
                                                             every_n_train_steps=50)])
    """

    _last_every_n_train_steps = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._every_n_train_steps >= 1 and self.monitor is not None and self.save_last:
            # Steps trigger last.ckpt only; validation chooses best.ckpt, as without them.
            self._last_every_n_train_steps = self._every_n_train_steps
            self._every_n_train_steps, self._every_n_epochs = 0, 1

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self._last_every_n_train_steps
        if (
            every
            and trainer.global_step % every == 0
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            # Not this step's checkpoint: a validation at the same step still saves best and last.
            self._last_global_step_saved = saved

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        same = saved is not None and self.dirpath is not None
        if same and os.path.realpath(saved) == os.path.realpath(self.dirpath):
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)


__all__ = ["BestAndLastCheckpoint"]

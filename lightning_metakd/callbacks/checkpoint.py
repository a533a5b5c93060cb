"""The ``metakd`` command's checkpoint: ``best.ckpt`` on the best ``val/acc`` and a real ``last.ckpt``."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


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


__all__ = ["BestAndLastCheckpoint"]

"""The run's hyperparameters with its final metrics in TensorBoard's HPARAMS tab."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_metakd.spec import component_spec


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


__all__ = ["HyperparameterMetrics", "run_hyperparameters"]

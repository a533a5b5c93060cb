"""The LightningCLI of ``metakd fit|validate|test|predict``: its defaults and its checkpoint.

Built here, below both :mod:`lightning_metakd.pipeline` (whose training stages run through it) and
:mod:`lightning_metakd.cli` (the ``metakd`` command), so neither imports the other.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_metakd.callbacks import BestAndLastCheckpoint
from lightning_metakd.data import EpisodicDataModule

#: ``DistillationModule`` weight arguments of lightning-metakd 0.1 and the terms they became.
LEGACY_WEIGHTS = {
    "task_weight": "TaskLoss",
    "soft_label_weight": "SoftLabels",
    "feature_weight": "FeatureHints",
    "attention_transfer_weight": "AttentionTransfer",
    "attention_weight": "AttentionDistillation",
    "anchor_weight": "ParameterAnchor",
}
#: Their other arguments: ``{argument: (term, term argument)}``.
LEGACY_OPTIONS = {
    "temperature": ("SoftLabels", "temperature"),
    "attention_kind": ("AttentionDistillation", "kind"),
    "layer_map": ("AttentionDistillation", "layer_map"),
    "feature_taps": ("FeatureHints", "student_taps"),
}


#: Trainer defaults that suit meta-learning; every one can be overridden in a config or flag.
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "metakd", "default_hp_metric": False},
    },
    # The inner loop needs gradients in validation and test; the modules also guard this themselves.
    "inference_mode": False,
    "log_every_n_steps": 10,
}

#: The default ``trainer.callbacks``: the TensorBoard extras of :mod:`lightning_metakd.callbacks`.
#: A config's ``trainer.callbacks`` replaces the list; ``trainer.callbacks+:`` appends to it.
DEFAULT_CALLBACKS: list[dict[str, Any]] = [
    {"class_path": "lightning_metakd.callbacks.EpisodeImages"},
    {"class_path": "lightning_metakd.callbacks.AttentionMaps"},
    {"class_path": "lightning_metakd.callbacks.HyperparameterMetrics"},
]


class MetaKDCLI(LightningCLI):
    """LightningCLI with a checkpoint on the best ``val/acc`` and the last step, always on."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - jsonargparse parser
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best",
                "trainer.callbacks": DEFAULT_CALLBACKS,
            }
        )


def legacy_terms_yaml(init_args: dict[str, Any]) -> str | None:
    """The ``terms:`` YAML that replaces 0.1's weight arguments in ``init_args``, or ``None``.

    Example:
        >>> print(legacy_terms_yaml({"soft_label_weight": 1.0, "temperature": 4.0}))
        terms:
        - class_path: lightning_metakd.distill.TaskLoss
          init_args:
            weight: 1.0
        - class_path: lightning_metakd.distill.SoftLabels
          init_args:
            weight: 1.0
            temperature: 4.0
        <BLANKLINE>
    """
    if not any(k in LEGACY_WEIGHTS or k in LEGACY_OPTIONS for k in init_args):
        return None
    weights = {"task_weight": 1.0, "soft_label_weight": 1.0}  # 0.1's defaults
    weights.update({k: v for k, v in init_args.items() if k in LEGACY_WEIGHTS})
    terms = {LEGACY_WEIGHTS[k]: {"weight": v} for k, v in weights.items() if v}
    for key, (term, arg) in LEGACY_OPTIONS.items():
        if key in init_args and term in terms:
            if key == "feature_taps":  # [student path, teacher path(s)]
                taps = list(init_args[key])
                terms[term].update(student_taps=taps[:1], teacher_taps=taps[1:])
            else:
                terms[term][arg] = init_args[key]
    entries = [
        {"class_path": f"lightning_metakd.distill.{term}", "init_args": args}
        for term, args in terms.items()
    ]
    return yaml.safe_dump({"terms": entries}, sort_keys=False)


def check_legacy_config(args: list[str] | None) -> None:
    """Stop with the new YAML when a ``--config`` names 0.1's DistillationModule weight arguments."""
    argv = list(sys.argv[1:] if args is None else args)
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    configs += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for config in configs:
        try:
            data = yaml.safe_load(Path(config).read_text())
        except (OSError, yaml.YAMLError):
            continue  # the CLI itself reports a missing or broken file
        model = data.get("model") if isinstance(data, dict) else None
        init_args = model.get("init_args") if isinstance(model, dict) else None
        distiller = isinstance(model, dict) and str(model.get("class_path", "")).endswith(
            "DistillationModule"
        )
        if not distiller or not isinstance(init_args, dict):
            continue
        replacement = legacy_terms_yaml(init_args)
        if replacement is not None:
            old = [k for k in init_args if k in LEGACY_WEIGHTS or k in LEGACY_OPTIONS]
            indented = "".join(f"    {line}\n" for line in replacement.splitlines())
            print(
                f"metakd: error: {config}: {', '.join(old)} are arguments of lightning-metakd "
                f"0.1; distillation terms are now a list. Replace them under model.init_args "
                f"with:\n{indented}",
                file=sys.stderr,
            )
            raise SystemExit(2)


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> MetaKDCLI:
    """Run (or, with ``run=False``, only build) the LightningCLI on ``args``."""
    check_legacy_config(args)
    return MetaKDCLI(
        L.LightningModule,
        EpisodicDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


__all__ = [
    "DEFAULT_CALLBACKS",
    "LEGACY_OPTIONS",
    "LEGACY_WEIGHTS",
    "TRAINER_DEFAULTS",
    "MetaKDCLI",
    "check_legacy_config",
    "legacy_terms_yaml",
    "run_lightning_cli",
]

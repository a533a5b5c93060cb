"""``metakd report``: compare checkpoints on the same fixed test episodes."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_metakd.data import EpisodicDataModule
from lightning_metakd.distill import TeacherEnsemble
from lightning_metakd.lightning_cli import data_fixes, data_section, describe_mismatch
from lightning_metakd.modules import read_checkpoint
from lightning_metakd.report.comparison import Measured, checkpoint_learners, compare
from lightning_metakd.report.tables import markdown_table


def report_datamodule(data_config: Mapping[str, Any]) -> EpisodicDataModule:
    """Instantiate an :class:`~lightning_metakd.data.EpisodicDataModule` from its ``class_path`` config.

    The ``data:`` section of a LightningCLI config (``{"class_path": ..., "init_args": {...}}``):
    how ``metakd report`` and the pipeline's report stage build their test episodes.
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(EpisodicDataModule, "data")
    parsed = parser.parse_object({"data": dict(data_config)})
    return parser.instantiate_classes(parsed)["data"]


def _learners_from_checkpoints(specs: list[str]) -> dict[str, Measured]:
    """``[NAME=]CHECKPOINT`` entries -> rows; a distillation checkpoint gives its teachers too."""
    learners: dict[str, Measured] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else ("", spec)
        checkpoint = read_checkpoint(path)
        if checkpoint.kind == "distillation":
            rows = checkpoint_learners(checkpoint)
            if name:  # the student's row takes the given name
                rows[name] = rows.pop("distilled student")
            learners.update(rows)
        else:
            learners[name or Path(path).parent.parent.name] = checkpoint.learner()
    return learners


def check_report_data(
    learners: Mapping[str, Measured], datamodule: EpisodicDataModule, source: str
) -> None:
    """Raise a ValueError naming the settings to change when ``--data`` cannot feed a learner."""
    for name, measured in learners.items():
        members = measured.learners if isinstance(measured, TeacherEnsemble) else [measured]
        for learner in members:
            fixes = data_fixes(learner, datamodule)
            if fixes:
                settings = ", ".join(f"{k}: {v}" for k, v in fixes.items())
                mismatch = describe_mismatch(learner, datamodule, repr(name))
                raise ValueError(f"{mismatch}; set {settings} in {source}'s data init_args.")


def report_main(argv: list[str]) -> int:
    """``metakd report``: compare checkpoints on the same fixed test episodes (:func:`compare`)."""
    import argparse
    import sys

    import yaml

    parser = argparse.ArgumentParser(
        prog="metakd report",
        description="Accuracy ± 95%% CI, the paired per-episode accuracy difference against a "
        "reference row (± 95%% CI), parameters, FLOPs and CPU latency per adapted episode of "
        "trained learners on the same fixed test episodes; writes report.json, .md and .png.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="a LightningCLI YAML whose `data:` section gives the episodes",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="YAML",
        help="test on other data (cross-domain): a config whose `data:` section, or a YAML "
        "holding only class_path/init_args, replaces --config's data whole",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="[NAME=]CKPT",
        help="a MetaLearnerModule or DistillationModule checkpoint (repeat it); a distillation "
        "checkpoint adds its teacher(s) (and their ensemble) before its student",
    )
    parser.add_argument("--test_ways", type=int, default=None, help="override data test_ways")
    parser.add_argument(
        "--grouping", default=None, help="override data grouping (e.g. none: across groups)"
    )
    parser.add_argument("--out", required=True, help="folder for report.json/.md/.png")
    parser.add_argument("--repeats", type=int, default=10, help="latency runs per learner")
    parser.add_argument(
        "--reference",
        default=None,
        metavar="NAME",
        help="the row (learner name) the paired per-episode accuracy differences are taken "
        "against (default: the first row)",
    )
    opts = parser.parse_args(argv)
    try:
        config = yaml.safe_load(Path(opts.config).read_text()) or {}
        data = copy.deepcopy(data_section(opts.data) if opts.data else config.get("data") or {})
        if not data:
            raise ValueError(
                f"{opts.config} has no `data:` section to take the test episodes from."
            )
        init_args = data.setdefault("init_args", {})
        for key in ("test_ways", "grouping"):
            if getattr(opts, key) is not None:
                init_args[key] = getattr(opts, key)
        datamodule = report_datamodule(data)
        datamodule.prepare_data()
        learners = _learners_from_checkpoints(opts.checkpoint)
        if opts.data:
            check_report_data(learners, datamodule, opts.data)
        rows = compare(
            learners, datamodule, opts.out, repeats=opts.repeats, reference=opts.reference
        )
    except (OSError, ValueError, TypeError, KeyError) as err:
        print(f"metakd report: error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    print(f"written {Path(opts.out) / 'report.json'}, report.md, report.png")
    return 0


__all__ = ["check_report_data", "report_datamodule", "report_main"]

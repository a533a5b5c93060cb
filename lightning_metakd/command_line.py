"""How ``metakd``'s own subcommands meet the user: their parsers, flag spellings and error lines.

Three conventions, kept in one place (two modules) so that every subcommand follows them:

- **Parsers that load in a blink.** One function per subcommand builds its parser from argparse
  or jsonargparse alone (:func:`pipeline_parser`, :func:`report_parser`, :func:`finetune_parser`,
  :func:`export_parser`, :func:`classify_parser`, :func:`episodes_parser`, :func:`sweep_parser`,
  :func:`bench_parser`, :func:`pretrained_parser`). This module imports
  nothing of ours, torch or Lightning, so ``metakd <command> --help`` answers in a fraction of a
  second (:func:`lightning_metakd.cli.main` builds the parser and prints its help before it
  imports the command's module) instead of the 6-9 s that importing torch and Lightning takes.
- **One spelling of a flag.** Multi-word flags use underscores, as LightningCLI does
  (``--trainer.max_epochs``, ``--test_ways``, ``--run_dir``). The hyphenated spellings of earlier
  releases (``--run-dir``, ``--meta-batch-size``, ``--batch-size``) still work and print a
  deprecation note (:class:`CommandParser`).
- **Expected mistakes in one line**, the same for every subcommand: the error half,
  :func:`fail`, :class:`UsageError` and :func:`explain_config_error`, lives in
  :mod:`lightning_metakd.command_errors` and is re-exported here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_metakd.command_errors import (  # noqa: F401 (re-exported: the parsers' error half)
    EXPECTED,
    TRACEBACK_ENV,
    UsageError,
    did_you_mean,
    expected_error,
    explain_config_error,
    fail,
    message_of,
    show_traceback,
)

#: ``metakd export --formats`` (``lightning_metakd.deploy.predict.FORMATS``; a test pins them equal).
FORMATS = ("torch_export", "onnx")


# -- parsers ------------------------------------------------------------------------------------------
class CommandParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` that accepts the hyphenated spellings of its flags, with a note.

    ``--run-dir x`` and ``--run-dir=x`` are read as ``--run_dir``, and print
    ``metakd pipeline: note: --run-dir is deprecated; use --run_dir.`` once per flag on stderr.

    Example:
        >>> parser = CommandParser(prog="demo")
        >>> _ = parser.add_argument("--run_dir")
        >>> parser.parse_args(["--run-dir=runs/x"]).run_dir
        'runs/x'
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._underscored(given), namespace)

    def _underscored(self, args: list[str]) -> list[str]:
        out, noted = [], set()
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            flag, eq, value = arg.partition("=")
            known = self._option_string_actions
            if flag.startswith("--") and "-" in flag[2:] and flag not in known:
                spelt = "--" + flag[2:].replace("-", "_")
                if spelt in known:
                    if flag not in noted:
                        noted.add(flag)
                        print(
                            f"{self.prog}: note: {flag} is deprecated; use {spelt}.",
                            file=sys.stderr,
                        )
                    arg = spelt + eq + value
            out.append(arg)
        return out


def pipeline_parser() -> CommandParser:
    """``metakd pipeline``: the pipeline YAML, ``--force``, ``--run_dir``, ``--processes``."""
    parser = CommandParser(
        prog="metakd pipeline",
        description=(
            "Train a teacher, a baseline student and a distilled student, then compare them on "
            "the same test episodes. Finished stages are skipped when run again."
        ),
    )
    parser.add_argument("--config", required=True, help="the pipeline YAML")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument("--run_dir", default=None, help="run folder (default runs/pipeline/<name>)")
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="how many stages may train at once (default: the YAML's `processes`, else 1)",
    )
    return parser


def report_parser() -> CommandParser:
    """``metakd report``: checkpoints, the config whose ``data:`` gives the episodes, the output."""
    parser = CommandParser(
        prog="metakd report",
        description="Accuracy ± 95% CI, the paired per-episode accuracy difference against a "
        "reference row (± 95% CI), parameters, FLOPs and CPU latency per adapted episode of "
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
    return parser


def sweep_parser() -> CommandParser:
    """``metakd sweep``: configs to compare, the seeds, overrides, the sweep folder."""
    parser = CommandParser(
        prog="metakd sweep",
        description="Fit and test each config once per seed (seed_everything and the training "
        "episodes change; the class split and test episodes do not), then print accuracy mean ± "
        "sd over seeds beside each run's 95%% CI and, with several configs, the paired "
        "per-episode difference of each against the first. Finished runs are skipped.",
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="[NAME=]YAML",
        help="a metakd fit config (repeat it to compare configs)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[NAME:]KEY=VALUE",
        help="a config override for every run, e.g. trainer.max_epochs=2; NAME: for one "
        "config's runs only",
    )
    parser.add_argument("--out", default=None, help="the sweep folder (default runs/sweep/<name>)")
    parser.add_argument("--force", action="store_true", help="rerun every seed")
    return parser


def bench_parser() -> CommandParser:
    """``metakd bench``: the data, the published settings, seeds, overrides, the bench folder."""
    parser = CommandParser(
        prog="metakd bench",
        description="Run the papers' settings (configs/omniglot, configs/miniimagenet) on your "
        "copy of the data and print reported vs ours, with each row's normalisation policy and "
        "seeds. Finished runs are skipped when run again.",
    )
    parser.add_argument("--root", nargs="+", default=None, help="the folder(s) holding the data")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        metavar="NAME",
        help="published settings by name or glob, e.g. 'omniglot/*'",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED")
    parser.add_argument("--max_steps", type=int, default=None, help="cap every run's steps")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test in minutes: 2 steps, 20 test episodes (numbers mean nothing)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, e.g. data.init_args.num_workers=4",
    )
    parser.add_argument(
        "--out", default="runs/bench", help="the bench folder (default %(default)s)"
    )
    parser.add_argument(
        "--configs",
        default=str(Path(__file__).resolve().parents[1] / "configs"),
        help="the configs/ folder",
    )
    parser.add_argument("--force", action="store_true", help="rerun every run")
    parser.add_argument("--list", action="store_true", help="list the published settings")
    return parser


def finetune_arguments(
    checkpoint: str,
    data_root: str,
    output: str = "runs/finetune",
    holdout: int | float = 0.2,
    seed: int = 0,
    epochs: int = 0,
    lr: float = 1e-3,
    optimizer: Literal["adam", "sgd"] = "adam",
    anchor_weight: float = 0.0,
    batch_size: int | None = None,
    statistics: Literal["fixed", "batch"] = "fixed",
    invert: bool = False,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> None:
    """The arguments of ``metakd finetune``: :func:`~lightning_metakd.deploy.run_finetune`'s.

    A signature without a body, so that the parser is built without importing
    :mod:`lightning_metakd.deploy` (torch); ``tests/test_cli.py`` pins it to ``run_finetune``'s
    signature and documentation.

    Args:
        checkpoint: a ``MetaLearnerModule`` or ``DistillationModule`` checkpoint (``best.ckpt``).
        data_root: a folder of class folders, a few images each.
        output: the folder to write into.
        holdout: images held out per class to measure accuracy: a fraction (0.2) or a count (2); 0
            for none.
        seed: picks the held-out images and shuffles fine-tuning batches.
        epochs: fine-tuning passes over the images after adaptation (0: adapt only).
        lr: fine-tuning step size.
        optimizer: "adam" or "sgd" (momentum 0.9).
        anchor_weight: λ of the λ‖θ − θ*‖² anchor to the meta-learned θ* (0: off).
        batch_size: images per fine-tuning step (default: all at once).
        statistics: "fixed" freezes the BatchNorm statistics of the labelled images into the
            classifier (each image is classified on its own); "batch" keeps the learner's batch
            statistics.
        invert: invert the images when reading them (dark drawings on a light background for a
            learner trained on light-on-dark ones, like KanjiVG).
        mean: per-channel mean subtracted after reading, as the learner's data module did
            (mini-ImageNet with normalize: [0.485, 0.456, 0.406]); default none.
        std: per-channel standard deviation divided by after ``mean``.
        image_size: input side length; default (and must equal) the backbone's.
        channels: input channels; default (and must equal) the backbone's.
    """


def finetune_parser() -> Any:  # a jsonargparse ArgumentParser
    """``metakd finetune``: every argument of :func:`~lightning_metakd.deploy.run_finetune`, and
    ``--config`` (a YAML of them)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="metakd finetune",
        description=(
            "Adapt a meta-learned or distilled learner to the classes of a folder of class "
            "folders, optionally fine-tune it, report held-out accuracy and write a classifier."
        ),
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML of these arguments")
    parser.add_function_arguments(finetune_arguments, as_group=False)
    return parser


def export_parser() -> CommandParser:
    """``metakd export``: a fine-tuned classifier or a learner, the formats, the check tolerances."""
    parser = CommandParser(
        prog="metakd export",
        description="Export a classifier written by `metakd finetune` (--classifier), or a "
        "learner's adaptation itself as enrol + classify graphs (--learner), to torch.export and "
        "ONNX, checking the exported logits against PyTorch's.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--classifier", help="classifier.pt of `metakd finetune`")
    source.add_argument(
        "--learner",
        help="a MetaLearnerModule or DistillationModule checkpoint (its student): export the "
        "adaptation itself, enrol + classify graphs (lightning_metakd.deploy.learner_export)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="default: <classifier folder>/export; for --learner <run folder>/export",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        default=None,
        help="images to check the exported files on (default: the held-out images listed in "
        "finetune.json beside the classifier)",
    )
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--rtol", type=float, default=0.0)
    learner = parser.add_argument_group("--learner options")
    learner.add_argument("--normalization", choices=["support", "population"], default=None,
                         help="the BatchNorm policy baked in (default: the learner's; "
                         "transductive learners: support)")  # fmt: skip
    learner.add_argument("--frozen_body", action="store_true",
                         help="MAML / Meta-SGD: adapt only the head in the graph")  # fmt: skip
    learner.add_argument("--calibration", default=None, metavar="CONFIG",
                         help="a config whose data: gives meta-training tasks (population "
                         "statistics, int8 calibration)")  # fmt: skip
    learner.add_argument("--int8", action="store_true",
                         help="also write int8 graphs to <output>/int8 (needs --calibration)")  # fmt: skip
    learner.add_argument("--invert", action="store_true", help="images are inverted (1 - x)")
    learner.add_argument("--mean", type=float, nargs="+", default=None)
    learner.add_argument("--std", type=float, nargs="+", default=None)
    return parser


def classify_parser() -> CommandParser:
    """``metakd classify``: an exported classifier and image files."""
    parser = CommandParser(
        prog="metakd classify",
        description="Classify image files with an exported classifier (model.pt2 or model.onnx), "
        "or with an exported learner after enrolling classes (--enrol FOLDER or --state FILE).",
    )
    parser.add_argument("--model", required=True, help="directory written by export_classifier")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="default: model.pt2 if present (an exported learner: its ONNX graphs)",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="images per forward pass (default: 32 with fixed BatchNorm statistics or an "
        "exported learner, else 1)",
    )
    parser.add_argument(
        "--sheet", default=None, help="also write a PNG of the images with their predictions"
    )
    parser.add_argument(
        "--enrol",
        default=None,
        metavar="FOLDER",
        help="an exported learner (`metakd export --learner`): enrol the classes of this folder "
        "of class folders, a few images each, then classify",
    )
    parser.add_argument("--state", default=None, help="an exported learner: a saved enrolment")
    parser.add_argument("--save_state", default=None, help="write the enrolment to this .npz")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    return parser


def pretrained_parser() -> CommandParser:
    """``metakd pretrained``: list the shipped models."""
    parser = CommandParser(
        prog="metakd pretrained",
        description="List the models shipped inside the package (name, kind, parameters, "
        "normalisation policy, accuracy, file size); use one as pretrained:<name> wherever a "
        "checkpoint path goes.",
    )
    parser.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    return parser


def episodes_parser() -> CommandParser:
    """``metakd episodes``: the episode shape and how many meta-batches to time."""
    parser = CommandParser(
        prog="metakd episodes", description="Draw episodes from the embedded KanjiVG data set."
    )
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta_batch_size", type=int, default=32)
    parser.add_argument("--grouping", default="none", choices=["none", "radical"])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--cache_dir", default=None)
    return parser


__all__ = [
    "EXPECTED",
    "FORMATS",
    "TRACEBACK_ENV",
    "CommandParser",
    "UsageError",
    "classify_parser",
    "did_you_mean",
    "episodes_parser",
    "expected_error",
    "explain_config_error",
    "export_parser",
    "fail",
    "finetune_arguments",
    "finetune_parser",
    "message_of",
    "pipeline_parser",
    "pretrained_parser",
    "report_parser",
    "show_traceback",
]

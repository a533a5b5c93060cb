"""How ``metakd``'s own subcommands meet the user: their parsers, flag spellings and error lines.

Three conventions, kept in one place so that every subcommand follows them:

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
- **Expected mistakes in one line.** A library ``ValueError`` (a bad setting, a missing or foreign
  checkpoint), a config typo or a missing file prints ``metakd <command>: error: <message>``
  (with "did you mean ...?" for a misspelt key) and exits with status 2 (:func:`fail`,
  :func:`explain_config_error`). ``--traceback`` (or ``METAKD_TRACEBACK=1``) shows the full Python
  traceback instead; anything unexpected (a bug) always does.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

#: The environment variable that asks for full tracebacks (``metakd --traceback`` sets it).
TRACEBACK_ENV = "METAKD_TRACEBACK"
#: The exception types of expected mistakes, when our own code raised them (:func:`expected_error`).
EXPECTED = (ValueError, TypeError, LookupError, OSError)
#: ``metakd export --formats`` (``lightning_metakd.deploy.predict.FORMATS``; a test pins them equal).
FORMATS = ("torch_export", "onnx")
_PACKAGE = str(Path(__file__).resolve().parent)


# -- errors -------------------------------------------------------------------------------------------
class UsageError(SystemExit):
    """A mistake on the command line or in a config: one message, exit status 2.

    A ``SystemExit`` so that it leaves argument parsing the way argparse's own errors do (code that
    catches those, e.g. LightningCLI's, sees the same type); :func:`lightning_metakd.cli.main`
    prints :attr:`message` as ``metakd <command>: error: <message>``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def show_traceback() -> bool:
    """Whether the user asked for full tracebacks (``--traceback`` or ``METAKD_TRACEBACK=1``)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by lightning-metakd's own code (its innermost frame is ours)."""
    tb = err.__traceback__
    if tb is None:
        return True  # constructed and raised by the caller without a traceback: a message of ours
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_PACKAGE)


def expected_error(err: BaseException) -> BaseException | None:
    """The exception whose message tells the user what to fix, or ``None`` for a bug.

    jsonargparse and Lightning wrap errors raised while they build the model or the data (the
    library's "ways must be at least 2, got 1." arrives as the cause of a "Does not validate
    against any of the Union subtypes" ``ValueError`` with a namespace dump), so this follows the
    ``__cause__`` chain to its end. That innermost error is expected when it is a missing file,
    or one of :data:`EXPECTED` raised by our own code, whose messages are written for users.

    Example:
        >>> expected_error(ValueError("ways must be at least 2, got 1."))
        ValueError('ways must be at least 2, got 1.')
        >>> try:
        ...     {}["x"]
        ... except KeyError as err:
        ...     print(expected_error(err))
        None
    """
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, UsageError | FileNotFoundError):
        return root
    if isinstance(root, EXPECTED) and _raised_here(root):
        return root
    return None


def message_of(err: BaseException) -> str:
    """The user-facing text of an exception (a ``KeyError``'s without its repr quotes)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename!r}"
    return str(err) or type(err).__name__


def fail(prog: str, err: BaseException, catch_all: bool = False) -> int:
    """Print ``<prog>: error: <message>`` and return the exit status 2.

    Call it from an ``except`` block. The message is that of :func:`expected_error` (the innermost
    cause of a wrapped library error), else ``err``'s own. It re-raises ``err``, so that its
    traceback is shown, with ``--traceback``/``METAKD_TRACEBACK=1``, and with ``catch_all`` (an
    ``except Exception``) when ``err`` is not an expected mistake: a bug keeps its traceback.
    """
    cause = expected_error(err)
    if show_traceback() or (catch_all and cause is None):
        raise err
    print(f"{prog}: error: {message_of(cause or err)}", file=sys.stderr, flush=True)
    return 2


def did_you_mean(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """``"; did you mean 'shots'?"`` for the closest of ``candidates`` (difflib), else ``""``.

    Example:
        >>> did_you_mean("shot", ["ways", "shots", "queries"])
        "; did you mean 'shots'?"
        >>> did_you_mean("xyz", ["ways", "shots"])
        ''
    """
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


def _init_arguments(class_path: str) -> list[str]:
    """The ``init_args`` a class accepts: its ``__init__`` parameters, and its bases' for ``**kwargs``."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else [cls]:
        init = klass.__init__ if inspect.isclass(cls) else klass
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        names += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return [n for n in dict.fromkeys(names) if n != "self"]


def _module_names(module: str) -> list[str]:
    try:
        found = importlib.import_module(module)
    except ImportError:
        return []
    return list(getattr(found, "__all__", None) or [n for n in dir(found) if not n.startswith("_")])


_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value"
    r"( type)?:|- Expected a <class 'NoneType'>|tip: )"
)
_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^(?:- )?Problem with given class_path '([^']+)':\s*$")
_OPTION = re.compile(r"^(?:- )?Option '([^']+)' is not accepted$")
_SUBCOMMAND_OPTION = re.compile(r"^Subcommand '([^']+)' does not accept option '([^']+)'$")
_NO_ATTRIBUTE = re.compile(r"^module '([\w.]+)' has no attribute '(\w+)'$")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)$")


def explain_config_error(message: str, keys: Sequence[str] = ()) -> str:
    """jsonargparse's nested, multi-line parse error as one line, with "did you mean" for a typo.

    The message names the config key and what is wrong with it: an unknown key of a class (with
    the closest argument that class takes), an unknown option (with the closest of ``keys``, the
    parser's option names), a class path that names nothing (with the closest name in its
    module), or the innermost message with the key it belongs to.

    Example:
        >>> explain_config_error(
        ...     'Parser key "data":\\n  Does not validate against any of the Union subtypes\\n'
        ...     "  Errors:\\n    - Problem with given class_path 'argparse.ArgumentParser':\\n"
        ...     "        Option 'prgo' is not accepted\\n    - Expected a <class 'NoneType'>"
        ... )
        "data.init_args.prgo: argparse.ArgumentParser takes no argument 'prgo'; did you mean 'prog'?"
        >>> explain_config_error(
        ...     "Subcommand 'fit' does not accept option 'trainer.max_epoch'", ["trainer.max_epochs"]
        ... )
        "unknown option 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"
        >>> explain_config_error("unrecognized arguments: --trainer.max_epohcs 2", ["trainer.max_epochs"])
        "unrecognized argument '--trainer.max_epohcs'; did you mean '--trainer.max_epochs'?"
    """
    stack: list[tuple[int, str, str]] = []  # (indent, "key" | "class", value)
    leaves: list[tuple[list[tuple[int, str, str]], str]] = []
    for raw in message.splitlines():
        text = raw.strip()
        if not text or _NOISE.match(text):
            continue
        indent = len(raw) - len(raw.lstrip()) + (2 if text.startswith("- ") else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if match := _KEY.match(text):
            stack.append((indent, "key", match[1]))
            if match[2]:
                leaves.append((list(stack), match[2]))
        elif match := _CLASS.match(text):
            stack.append((indent, "class", match[1]))
        else:
            leaves.append((list(stack), text.removeprefix("- ")))
    if not leaves:
        return " ".join(message.split())
    # The most specific complaint: an unknown option or attribute, else the deepest message.
    context, text = max(
        leaves,
        key=lambda leaf: (
            bool(_OPTION.match(leaf[1]) or _NO_ATTRIBUTE.match(leaf[1])),
            len(leaf[0]),
        ),
    )
    path = ".".join("init_args" if kind == "class" else value for _, kind, value in context)
    owner = next((value for _, kind, value in reversed(context) if kind == "class"), None)
    if (match := _OPTION.match(text)) and owner is not None:
        key = f"{path}.{match[1]}" if path else match[1]
        hint = did_you_mean(match[1], _init_arguments(owner))
        return f"{key}: {owner} takes no argument {match[1]!r}{hint}"
    if match := _SUBCOMMAND_OPTION.match(text):
        return f"unknown option {match[2]!r}{did_you_mean(match[2], keys)}"
    if match := _OPTION.match(text):
        return f"unknown option {match[1]!r}{did_you_mean(match[1], keys)}"
    if (match := _UNRECOGNIZED.match(text)) and match[1].startswith("--"):
        flag = match[1].split()[0].split("=")[0]
        flags = [f"--{key}" for key in keys]
        return f"unrecognized argument {flag!r}{did_you_mean(flag, flags)}"
    if match := _NO_ATTRIBUTE.match(text):
        text += did_you_mean(match[2], _module_names(match[1]), cutoff=0.8)  # names are long
    return f"{path}: {text}" if path else text


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
    """``metakd pipeline``: the pipeline YAML, ``--force``, ``--run_dir``."""
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
        default=str(Path(_PACKAGE).parent / "configs"),
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

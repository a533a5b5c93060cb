"""The ``metakd`` command: one table of subcommands, each loaded only when it runs.

``metakd fit|validate|test|predict --config <yaml>`` are the LightningCLI stages
(:mod:`lightning_metakd.lightning_cli`); the other subcommands are listed in :data:`COMMANDS` with
the function that runs them and the one that builds their parser
(:mod:`lightning_metakd.command_line`). ``metakd`` alone or ``metakd --help`` lists them all, with
the shipped configs, and ``metakd <command> --help`` prints a subcommand's options, without
importing torch.

Expected mistakes print one ``metakd <command>: error: ...`` line and exit with status 2;
``--traceback`` anywhere on the command line (or ``METAKD_TRACEBACK=1``) shows the full traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_metakd.command_errors import TRACEBACK_ENV, UsageError, fail
from lightning_metakd.command_line import episodes_parser

#: ``{subcommand: (module:function that runs it, or "lightning"; module:function that builds its
#: parser, or None; one-line description)}``, in help order.
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "pipeline": (
        "lightning_metakd.pipeline:pipeline_main",
        "lightning_metakd.command_line:pipeline_parser",
        "teacher -> baseline student -> distilled student -> report, resumable",
    ),
    "fit": ("lightning", None, "meta-train a learner or distil a student from a YAML config"),
    "validate": ("lightning", None, "evaluate a checkpoint on the validation episodes"),
    "test": ("lightning", None, "evaluate a checkpoint on the fixed test episodes"),
    "predict": ("lightning", None, "label the query images of the test episodes"),
    "report": (
        "lightning_metakd.report:report_main",
        "lightning_metakd.command_line:report_parser",
        "compare checkpoints on the same test episodes: accuracy, paired differences, size, FLOPs",
    ),
    "bench": (
        "lightning_metakd.bench:bench_main",
        "lightning_metakd.command_line:bench_parser",
        "papers' settings on your data vs reported",
    ),
    "sweep": (
        "lightning_metakd.seeds:sweep_main",
        "lightning_metakd.command_line:sweep_parser",
        "configs once per seed: mean ± sd, paired Δ",
    ),
    "finetune": (
        "lightning_metakd.deploy.finetune:finetune_main",
        "lightning_metakd.command_line:finetune_parser",
        "adapt a learner to a folder of class folders and write a fixed classifier",
    ),
    "export": (
        "lightning_metakd.deploy.export:export_main",
        "lightning_metakd.command_line:export_parser",
        "write a fixed classifier as torch.export and ONNX programs",
    ),
    "classify": (
        "lightning_metakd.deploy.predict:classify_main",
        "lightning_metakd.command_line:classify_parser",
        "label image files with an exported classifier",
    ),
    "pretrained": (
        "lightning_metakd.pretrained.command:pretrained_main",
        "lightning_metakd.command_line:pretrained_parser",
        "list the models shipped in the package (use one as pretrained:<name>)",
    ),
    "episodes": (
        "lightning_metakd.cli:episodes_main",
        "lightning_metakd.command_line:episodes_parser",
        "draw KanjiVG episodes and print their shapes and speed",
    ),
}


def _load(target: str) -> Callable[..., Any]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def usage() -> str:
    """``metakd --help``: every subcommand with one line, and the shipped configs."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: metakd <command> [options]   (metakd <command> --help for its options)",
        "",
        "Meta-knowledge distillation: meta-train a teacher on few-shot tasks, distil it into a",
        "small student that still adapts.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()),
        "",
        f"--traceback (or {TRACEBACK_ENV}=1), with any command: show an error's full traceback",
    ]
    configs = Path(__file__).resolve().parent.parent / "configs"
    if configs.is_dir():
        found = sorted(p.relative_to(configs.parent).as_posix() for p in configs.rglob("*.yaml"))
        first = "configs/kanji/pipeline.yaml"
        found = [first, *(p for p in found if p != first)] if first in found else found
        lines += ["", "shipped configs (start with the first: metakd pipeline --config ...):"]
        lines += [f"  {p}" for p in found]
    return "\n".join(lines) + "\n"


def episodes_main(argv: list[str]) -> int:
    """``metakd episodes``: draw KanjiVG episodes and print their shapes and throughput."""
    opts = episodes_parser().parse_args(argv)
    try:
        return _episodes(opts)
    except Exception as err:  # noqa: BLE001 - fail() re-raises everything but expected mistakes
        return fail("metakd episodes", err, catch_all=True)


def _episodes(opts: Any) -> int:
    from lightning_metakd.data import KanjiDataModule

    dm = KanjiDataModule(
        ways=opts.ways,
        shots=opts.shots,
        queries=opts.queries,
        meta_batch_size=opts.meta_batch_size,
        grouping=opts.grouping,
        steps_per_epoch=opts.batches,
        num_workers=opts.num_workers,
        cache_dir=opts.cache_dir,
    )
    t0 = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    print(f"data ready in {time.perf_counter() - t0:.1f} s")
    for split, ds in dm.splits.items():
        print(
            f"  {split:5s}: {ds.num_classes:5d} classes, {len(ds):7d} images, {len(ds.groups)} groups"
        )
    t0 = time.perf_counter()
    episode = None
    for batch in dm.train_dataloader():
        episode = batch
    elapsed = time.perf_counter() - t0
    assert episode is not None
    print(
        f"episode: support_x {tuple(episode.support_x.shape)}, support_y "
        f"{tuple(episode.support_y.shape)}, query_x {tuple(episode.query_x.shape)}, "
        f"query_y {tuple(episode.query_y.shape)}"
    )
    tasks = opts.batches * opts.meta_batch_size
    print(
        f"{opts.batches} meta-batches ({tasks} tasks) in {elapsed:.2f} s: {tasks / elapsed:.0f} tasks/s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metakd`` console script; returns the exit status.

    A subcommand's ``--help`` is answered by its parser alone (:data:`COMMANDS`), before its module
    (and with it torch) is imported. ``--traceback`` is taken out of the arguments and sets
    ``METAKD_TRACEBACK=1`` while the command runs.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    tracing = "--traceback" in args
    args = [a for a in args if a != "--traceback"]
    before = os.environ.get(TRACEBACK_ENV)
    if tracing:
        os.environ[TRACEBACK_ENV] = "1"
    try:
        return _dispatch(args)
    finally:
        if tracing:
            if before is None:
                os.environ.pop(TRACEBACK_ENV, None)
            else:
                os.environ[TRACEBACK_ENV] = before


def _dispatch(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    entry = COMMANDS.get(args[0])
    if entry is None and not args[0].startswith("-"):
        print(f"metakd: error: unknown command {args[0]!r}.\n\n{usage()}", end="", file=sys.stderr)
        return 2
    if entry is not None and entry[0] != "lightning":
        run, parser, _ = entry
        if parser is not None and ("-h" in args[1:] or "--help" in args[1:]):
            try:
                _load(parser)().parse_args(args[1:])
            except SystemExit as exit_:  # help printed (or a usage error reported)
                return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
        return _load(run)(args[1:])
    from lightning_metakd.lightning_cli import run_lightning_cli

    command = f"metakd {args[0]}" if entry is not None else "metakd"
    try:
        run_lightning_cli(args)
    except UsageError as err:
        print(f"{command}: error: {err.message}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:  # noqa: BLE001 - fail() re-raises everything but expected mistakes
        return fail(command, err, catch_all=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

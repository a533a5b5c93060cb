"""The ``metakd`` command: one table of subcommands, each loaded only when it runs.

``metakd fit|validate|test|predict --config <yaml>`` are the LightningCLI stages
(:mod:`lightning_metakd.lightning_cli`); the other subcommands are listed in :data:`COMMANDS` with
the function that runs them. ``metakd`` alone or ``metakd --help`` lists them all, with the shipped
configs, without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

#: ``{subcommand: (module:function or "lightning", one-line description)}``, in help order.
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": (
        "lightning_metakd.pipeline:pipeline_main",
        "teacher -> baseline student -> distilled student -> report, resumable",
    ),
    "fit": ("lightning", "meta-train a learner or distil a student from a YAML config"),
    "validate": ("lightning", "evaluate a checkpoint on the validation episodes"),
    "test": ("lightning", "evaluate a checkpoint on the fixed test episodes"),
    "predict": ("lightning", "label the query images of the test episodes"),
    "report": (
        "lightning_metakd.report:report_main",
        "compare checkpoints on the same test episodes: accuracy, paired differences, size, FLOPs",
    ),
    "bench": ("lightning_metakd.bench:bench_main", "papers' settings on your data vs reported"),
    "sweep": ("lightning_metakd.seeds:sweep_main", "configs once per seed: mean ± sd, paired Δ"),
    "finetune": (
        "lightning_metakd.deploy.finetune:finetune_main",
        "adapt a learner to a folder of class folders and write a fixed classifier",
    ),
    "export": (
        "lightning_metakd.deploy.export:export_main",
        "write a fixed classifier as torch.export and ONNX programs",
    ),
    "classify": (
        "lightning_metakd.deploy.predict:classify_main",
        "label image files with an exported classifier",
    ),
    "episodes": (
        "lightning_metakd.cli:episodes_main",
        "draw KanjiVG episodes and print their shapes and speed",
    ),
}


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
        *(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()),
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
    from lightning_metakd.data import KanjiDataModule

    parser = argparse.ArgumentParser(
        prog="metakd episodes", description="Draw episodes from the embedded KanjiVG data set."
    )
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--grouping", default="none", choices=["none", "radical"])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    opts = parser.parse_args(argv)
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
    """Entry point of the ``metakd`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    entry = COMMANDS.get(args[0])
    if entry is None and not args[0].startswith("-"):
        print(f"metakd: error: unknown command {args[0]!r}.\n\n{usage()}", end="", file=sys.stderr)
        return 2
    if entry is not None and entry[0] != "lightning":
        module, _, function = entry[0].partition(":")
        return getattr(importlib.import_module(module), function)(args[1:])
    from lightning_metakd.lightning_cli import run_lightning_cli

    # From the console, LightningCLI reads sys.argv itself (passing it too only earns a warning).
    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

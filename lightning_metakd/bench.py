"""``metakd bench``: the papers' settings on your own copy of the data, reported vs ours.

``configs/omniglot/`` and ``configs/miniimagenet/`` hold the published settings of MAML (Finn et
al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", Table 1) and
Prototypical Networks (Snell et al. 2017, "Prototypical Networks for Few-shot Learning", Tables 1
and 2); :data:`PUBLISHED` lists each with the accuracy its paper reports. :func:`run_bench` runs
a chosen set of them on the user's ``root`` — each once per seed through
:func:`lightning_metakd.seeds.run_seeds` (fit, then test the best checkpoint, in a subprocess per
run) — and writes the table "reported vs ours" with, in every row, the normalisation policy the
runs used (read from the checkpoints) and the seeds.

Budgets: the published budgets take days on a CPU. ``--max_steps`` caps the training steps and
``--quick`` shrinks everything (2 steps, 20 test episodes: a smoke test of the data and the
bookkeeping in minutes, whose numbers mean nothing); every row records the steps it trained and
its test episodes, and the table names the overrides under it. Resumable: finished runs are
skipped (``done.json``), so an interrupted bench continues where it stopped.

Example::

    metakd bench --list
    metakd bench --root ~/data/omniglot --settings 'omniglot/*' --quick
    metakd bench --root ~/data/miniimagenet --settings 'miniimagenet/protonet_*' --seeds 0 1 2
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_metakd.pipeline.config import PipelineConfigError
from lightning_metakd.pipeline.run import write_json_atomic
from lightning_metakd.seeds import SeedRuns, parse_sets, run_seeds

FINN = "Finn et al. 2017, Table 1"
SNELL_OMNIGLOT = "Snell et al. 2017, Table 1"
SNELL_MINI = "Snell et al. 2017, Table 2"
#: The shipped configs, beside the package in a source checkout.
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class PublishedSetting:
    """One published result and the config that reproduces its setting.

    Attributes:
        name: what ``--settings`` matches, e.g. ``"omniglot/maml_5way_1shot"``.
        title: the row's name in the table.
        config: the config, relative to the ``configs/`` folder.
        reported: the published test accuracy, in %.
        source: where it is published.
        dataset: which data set ``root`` must hold (``"omniglot"``, ``"miniimagenet"``).
        overrides: dotted config keys on top of ``config`` (the 5-shot mini-ImageNet settings).
    """

    name: str
    title: str
    config: str
    reported: float
    source: str
    dataset: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


def _omniglot(algorithm: str, ways: int, shots: int, reported: float, source: str):
    title = "MAML" if algorithm == "maml" else "ProtoNet"
    stem = f"{algorithm}_{ways}way_{shots}shot"
    return PublishedSetting(f"omniglot/{stem}", f"{title}, Omniglot {ways}-way {shots}-shot",
                            f"omniglot/{stem}.yaml", reported, source, "omniglot")  # fmt: skip


#: The published settings: MAML and ProtoNet, Omniglot 5/20-way 1/5-shot and mini-ImageNet 5-way
#: 1/5-shot (Conv4), with the accuracies their papers report.
PUBLISHED: tuple[PublishedSetting, ...] = (
    _omniglot("maml", 5, 1, 98.7, FINN),
    _omniglot("maml", 5, 5, 99.9, FINN),
    _omniglot("maml", 20, 1, 95.8, FINN),
    _omniglot("maml", 20, 5, 98.9, FINN),
    _omniglot("protonet", 5, 1, 98.8, SNELL_OMNIGLOT),
    _omniglot("protonet", 5, 5, 99.7, SNELL_OMNIGLOT),
    _omniglot("protonet", 20, 1, 96.0, SNELL_OMNIGLOT),
    _omniglot("protonet", 20, 5, 98.9, SNELL_OMNIGLOT),
    PublishedSetting("miniimagenet/maml_conv4_1shot", "MAML, mini-ImageNet 5-way 1-shot",
                     "miniimagenet/maml_conv4.yaml", 48.70, FINN, "miniimagenet"),
    # Finn et al.: meta-batches of 2 tasks for 5-shot.
    PublishedSetting("miniimagenet/maml_conv4_5shot", "MAML, mini-ImageNet 5-way 5-shot",
                     "miniimagenet/maml_conv4.yaml", 63.11, FINN, "miniimagenet",
                     {"data.init_args.shots": 5, "data.init_args.test_shots": 5,
                      "data.init_args.meta_batch_size": 2}),
    PublishedSetting("miniimagenet/protonet_conv4_1shot", "ProtoNet, mini-ImageNet 5-way 1-shot",
                     "miniimagenet/protonet_conv4.yaml", 49.42, SNELL_MINI, "miniimagenet"),
    # Snell et al.: 20-way training episodes for 5-shot.
    PublishedSetting("miniimagenet/protonet_conv4_5shot", "ProtoNet, mini-ImageNet 5-way 5-shot",
                     "miniimagenet/protonet_conv4.yaml", 68.20, SNELL_MINI, "miniimagenet",
                     {"data.init_args.shots": 5, "data.init_args.test_shots": 5,
                      "data.init_args.ways": 20, "model.init_args.ways": 20}),
)  # fmt: skip

#: ``--quick``: a smoke test of every setting in minutes (2 training steps, 20 test episodes).
QUICK: dict[str, Any] = {
    "trainer.max_steps": 2,
    "trainer.max_epochs": 1,
    "data.init_args.steps_per_epoch": 2,
    "data.init_args.meta_batch_size": 1,
    "data.init_args.val_episodes": 2,
    "data.init_args.test_episodes": 20,
    "data.init_args.num_workers": 0,
}


def select_settings(patterns: Sequence[str]) -> list[PublishedSetting]:
    """The settings whose names match any of ``patterns`` (``fnmatch`` globs), in table order.

    Example:
        >>> [s.name for s in select_settings(["omniglot/protonet_5way_*"])]
        ['omniglot/protonet_5way_1shot', 'omniglot/protonet_5way_5shot']
    """
    chosen = [s for s in PUBLISHED if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s.name, p) for s in PUBLISHED)]
    if unmatched:
        raise ValueError(
            f"no published setting matches {', '.join(map(repr, unmatched))}; `metakd bench "
            "--list` lists them (e.g. omniglot/maml_5way_1shot, 'omniglot/*')."
        )
    datasets = sorted({s.dataset for s in chosen})
    if len(datasets) > 1:
        raise ValueError(
            f"the settings read {' and '.join(datasets)}, but one --root holds one data set; "
            f"run them separately, e.g. --settings '{datasets[0]}/*'."
        )
    return chosen


def normalization_policy(checkpoint: str | Path) -> str:
    """The BatchNorm policy a checkpoint's learner used: its ``"normalization"`` component.

    A distillation checkpoint's student is read; checkpoints written before the policy was
    recorded used transductive batch statistics (MAML's convention), so they say so.
    """
    from lightning_metakd.modules import read_checkpoint

    found = read_checkpoint(checkpoint)
    if found.version == 1:
        spec = found.components
    else:
        spec = found.components.get("student" if found.kind == "distillation" else "learner", {})
    policy = spec.get("normalization", "transductive") if isinstance(spec, Mapping) else None
    return str(policy or "transductive")


def bench_row(setting: PublishedSetting, runs: SeedRuns) -> dict[str, Any]:
    """One row of the table: the published number, ours (mean ± sd over seeds) and the bookkeeping."""
    summary = runs.summary()
    policies = sorted({normalization_policy(run.checkpoint) for run in runs.runs})
    steps = sorted({int(run.marker.get("global_step", 0)) for run in runs.runs})
    data = runs.data_config().get("init_args", {})
    return {
        "name": setting.name,
        "title": setting.title,
        "source": setting.source,
        "config": setting.config,
        "reported": setting.reported,
        "ours": 100 * summary["accuracy"],
        "ours_sd": None if summary["accuracy_sd"] is None else 100 * summary["accuracy_sd"],
        "ci95": 100 * summary["ci95"],
        "diff": 100 * summary["accuracy"] - setting.reported,
        "seeds": summary["seeds"],
        "per_seed": {k: 100 * v for k, v in summary["per_seed"].items()},
        "normalization": ", ".join(policies),
        "steps": steps[0] if len(steps) == 1 else steps,
        "test_episodes": data.get("test_episodes"),
        "run_dir": str(runs.out_dir),
    }


def bench_table(rows: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any]) -> str:
    """The Markdown table "reported vs ours" (accuracies in %), and the overrides under it.

    Example:
        >>> row = {"title": "MAML, Omniglot 5-way 1-shot", "source": FINN, "reported": 98.7,
        ...        "ours": 97.25, "ours_sd": 0.5, "ci95": 0.31, "diff": -1.45, "seeds": [0, 1],
        ...        "normalization": "transductive", "steps": 60000, "test_episodes": 600}
        >>> print(bench_table([row], {}))
        | setting | reported (%) | ours (%), mean ± sd over seeds | Δ (points) | per-run 95% CI | normalisation | seeds | steps | test episodes | published in |
        |---|---:|---:|---:|---:|---|---|---:|---:|---|
        | MAML, Omniglot 5-way 1-shot | 98.70 | 97.25 ± 0.50 | -1.45 | ± 0.31 | transductive | 0, 1 | 60,000 | 600 | Finn et al. 2017, Table 1 |
        <BLANKLINE>
        The shipped configs' settings, unchanged (the root aside).
        <BLANKLINE>
    """
    lines = [
        "| setting | reported (%) | ours (%), mean ± sd over seeds | Δ (points) | per-run 95% CI "
        "| normalisation | seeds | steps | test episodes | published in |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in rows:
        ours = f"{r['ours']:.2f}" + ("" if r["ours_sd"] is None else f" ± {r['ours_sd']:.2f}")
        steps = f"{r['steps']:,}" if isinstance(r["steps"], int) else str(r["steps"])
        lines.append(
            f"| {r['title']} | {r['reported']:.2f} | {ours} | {r['diff']:+.2f} | ± {r['ci95']:.2f} "
            f"| {r['normalization']} | {', '.join(map(str, r['seeds']))} | {steps} | "
            f"{r['test_episodes']} | {r['source']} |"
        )
    if overrides:
        changed = ", ".join(f"{k}={v}" for k, v in overrides.items())
        note = f"Overrides on every setting: {changed} (not the published budget)."
    else:
        note = "The shipped configs' settings, unchanged (the root aside)."
    return "\n".join(lines) + f"\n\n{note}\n"


def run_bench(
    root: str | Path | Sequence[str | Path],
    settings: Sequence[PublishedSetting],
    out_dir: str | Path,
    seeds: Sequence[int] = (0,),
    overrides: Mapping[str, Any] | None = None,
    configs: str | Path = CONFIGS,
    force: bool = False,
    isolate: bool = True,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``settings`` on ``root`` once per seed; write ``bench.json`` and ``bench.md``; the rows.

    Each setting runs in ``<out_dir>/<setting name>/seed_<s>/`` (:func:`~lightning_metakd.seeds.
    run_seeds`, resumable); the table files are rewritten after every setting, so an interrupted
    bench leaves the rows it finished.

    Args:
        root: the folder (or folders) that hold the data set, ``data.init_args.root`` of every run.
        settings: from :data:`PUBLISHED` (:func:`select_settings`).
        out_dir: the bench folder.
        seeds: training seeds per setting.
        overrides: dotted config keys for every run (the budget: :data:`QUICK`,
            ``{"trainer.max_steps": 1000}``); recorded under the table.
        configs: the folder that holds ``omniglot/`` and ``miniimagenet/``.
        force, isolate, echo: as for :func:`~lightning_metakd.seeds.run_seeds`.
    """
    roots = [str(Path(r).expanduser()) for r in ([root] if isinstance(root, str | Path) else root)]
    missing = [r for r in roots if not Path(r).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"--root {missing[0]} is not a folder; pass the folder that holds your copy of the "
            "data set (nothing is downloaded)."
        )
    overrides = dict(overrides or {})
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for setting in settings:
        config = Path(configs) / setting.config
        if not config.is_file():
            raise FileNotFoundError(
                f"{setting.name}: no config at {config}; pass --configs the configs/ folder of a "
                "lightning-metakd checkout."
            )
        run_overrides = {
            "data.init_args.root": roots[0] if len(roots) == 1 else roots,
            **setting.overrides,
            **overrides,
        }
        runs = run_seeds(config, seeds, out / setting.name, run_overrides, name=setting.title,
                         force=force, isolate=isolate, echo=echo)  # fmt: skip
        rows.append(bench_row(setting, runs))
        write_json_atomic(out / "bench.json", {"root": roots, "overrides": overrides, "rows": rows})
        (out / "bench.md").write_text(bench_table(rows, overrides))
    return rows


def list_settings() -> str:
    """``metakd bench --list``: every published setting with its config and number."""
    width = max(len(s.name) for s in PUBLISHED)
    lines = [f"  {s.name:<{width}}  {s.reported:6.2f}%  {s.source}  (configs/{s.config}"
             + (f" + {json.dumps(dict(s.overrides))}" if s.overrides else "") + ")"
             for s in PUBLISHED]  # fmt: skip
    return "published settings (--settings takes these names or globs):\n" + "\n".join(lines) + "\n"


def bench_main(argv: list[str]) -> int:
    """``metakd bench``: parse the flags and run :func:`run_bench`."""
    from lightning_metakd.command_errors import fail
    from lightning_metakd.command_line import bench_parser

    opts = bench_parser().parse_args(argv)
    if opts.list:
        print(list_settings(), end="")
        return 0
    try:
        if not opts.root or not opts.settings:
            raise ValueError(
                "give --root (your copy of the data) and --settings (see --list), e.g. --root "
                "~/data/omniglot --settings 'omniglot/*' --quick."
            )
        overrides = dict(QUICK) if opts.quick else {}
        if opts.max_steps is not None:
            overrides["trainer.max_steps"] = opts.max_steps
        overrides.update(parse_sets(opts.set))
        rows = run_bench(opts.root, select_settings(opts.settings), opts.out, opts.seeds,
                         overrides, opts.configs, force=opts.force)  # fmt: skip
    except (OSError, ValueError, RuntimeError, PipelineConfigError) as err:
        return fail("metakd bench", err)
    print(bench_table(rows, overrides), end="")
    print(f"written {Path(opts.out) / 'bench.json'}, bench.md")
    return 0


__all__ = [
    "PUBLISHED",
    "QUICK",
    "PublishedSetting",
    "bench_main",
    "bench_row",
    "bench_table",
    "list_settings",
    "normalization_policy",
    "run_bench",
    "select_settings",
]

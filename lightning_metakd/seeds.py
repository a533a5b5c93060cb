"""Seeds: run a config once per training seed, then mean ± sd over seeds beside each run's CI.

A run's ``test/acc_ci95`` says how precisely its fixed test episodes pin *that run's* accuracy;
it says nothing about how much the accuracy moves when the model is initialised and trained
again. That spread — the seed-to-seed standard deviation — is what decides whether a
distillation gain survives a rerun, so tables of methods report both (e.g. Chen et al. 2019, "A
Closer Look at Few-shot Classification", re-ran every method; Bouthillier et al. 2021 on
variance in benchmarks).

A seed here changes what training does and nothing the test measures:

- ``seed_everything: s`` — the model's initialisation (and any other torch/NumPy randomness);
- ``data.init_args.train_seed: s`` — the training episodes
  (:class:`~lightning_metakd.data.EpisodicDataModule`'s ``train_seed``);
- the data's ``seed`` stays as configured: the class split and the fixed validation and test
  episodes are the same in every run, so runs of one config, and runs of two configs with the
  same data, answer the same test episodes. :func:`paired_over_seeds` uses that to take the
  *paired* per-episode difference of two configs (:func:`lightning_metakd.report.compare`) seed
  by seed, then its mean ± sd over seeds.

Each run is ``metakd fit`` then ``test`` of the best checkpoint in a subprocess of its own (a
crash, a leak or global state of one run cannot touch the next), in ``<out>/seed_<s>/`` with the
layout of a pipeline stage: ``stage_config.yaml``, the resolved ``config.yaml``, checkpoints,
TensorBoard events, ``log.txt`` (the run's output) and, once it has finished, ``done.json``. A
seed whose ``done.json`` is there for the same config is skipped when the sweep runs again.

Example (Python, e.g. a distillation study)::

    from lightning_metakd.seeds import run_seeds, paired_over_seeds, sweep_table
    overrides = {"data.init_args.root": "~/data/omniglot", "trainer.max_epochs": 5}
    baseline = run_seeds("configs/omniglot/protonet_5way_1shot.yaml", [0, 1, 2], "runs/s/base",
                         overrides={**overrides, "model.init_args.backbone.init_args.hidden": 16},
                         name="Conv4-16")
    distilled = run_seeds("configs/omniglot/distill_protonet.yaml", [0, 1, 2], "runs/s/kd",
                          overrides=overrides, name="Conv4-16 distilled")
    print(sweep_table([baseline, distilled]))
    print(paired_over_seeds(baseline, distilled, "runs/s/paired")["summary"])

Command::

    metakd sweep --config configs/kanji/protonet.yaml --seeds 0 1 2 --set trainer.max_epochs=2
    metakd sweep --config base=student.yaml --config kd=distill.yaml --set kd:model.init_args.teacher=t.ckpt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from lightning_metakd.pipeline.config import (
    MARKER,
    PipelineConfigError,
    PipelineSpec,
    StageSpec,
    _digest,
    _read_yaml,
    expand_dotted,
    merge_config,
    stage_config,
)
from lightning_metakd.pipeline.run import read_marker, write_json_atomic

#: The log of each run's subprocess, beside its ``done.json``.
LOG = "log.txt"


def seed_overrides(seed: int) -> dict[str, Any]:
    """What a seed sets: the initialisation (``seed_everything``) and the training episodes.

    Example:
        >>> seed_overrides(3)
        {'seed_everything': 3, 'data': {'init_args': {'train_seed': 3}}}
    """
    return {"seed_everything": seed, "data": {"init_args": {"train_seed": seed}}}


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``n − 1``); the sd is ``None`` for fewer than 2 values.

    Example:
        >>> mean_sd([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    if not values:
        raise ValueError("mean_sd needs at least one value.")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass
class SeedRun:
    """One finished run of a sweep: its seed, folder and ``done.json`` (test metrics included)."""

    seed: int
    run_dir: Path
    marker: dict[str, Any]

    @property
    def checkpoint(self) -> str:
        """The checkpoint that was tested (the best on ``val/acc``, else the last)."""
        return self.marker["checkpoint"]

    @property
    def accuracy(self) -> float:
        return float(self.marker["test"]["test/acc"])

    @property
    def ci95(self) -> float:
        return float(self.marker["test"].get("test/acc_ci95", 0.0))


@dataclass
class SeedRuns:
    """A config run once per seed (:func:`run_seeds`): the runs and their mean ± sd."""

    name: str
    config: Path
    out_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    runs: list[SeedRun] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]

    def summary(self) -> dict[str, Any]:
        """``{"name", "seeds", "accuracy", "accuracy_sd", "ci95", "per_seed"}`` (fractions).

        ``accuracy`` and ``accuracy_sd`` are the mean and sample sd over seeds of ``test/acc``;
        ``ci95`` is the mean over runs of their own ``test/acc_ci95`` (the test episodes' spread).
        """
        accuracy, sd = mean_sd([run.accuracy for run in self.runs])
        return {
            "name": self.name,
            "seeds": self.seeds,
            "accuracy": accuracy,
            "accuracy_sd": sd,
            "ci95": mean_sd([run.ci95 for run in self.runs])[0],
            "per_seed": {str(run.seed): run.accuracy for run in self.runs},
        }

    def data_config(self) -> dict[str, Any]:
        """The resolved ``data:`` section of the first run (what its CLI instantiated)."""
        run_dir = self.runs[0].run_dir
        resolved = run_dir / "config.yaml"
        config = _read_yaml(resolved if resolved.is_file() else run_dir / "stage_config.yaml", "")
        return dict(config.get("data") or {})

    def to_json(self) -> dict[str, Any]:
        runs = [
            {"seed": r.seed, "run_dir": str(r.run_dir), "checkpoint": r.checkpoint,
             "test": r.marker["test"], "global_step": r.marker.get("global_step"),
             "seconds": r.marker.get("seconds")}
            for r in self.runs
        ]  # fmt: skip
        return {
            "config": str(self.config),
            "overrides": self.overrides,
            "summary": self.summary(),
            "runs": runs,
        }


def run_config(seed: int, config: str | Path, out_dir: Path, overrides: Mapping[str, Any]) -> dict:
    """The LightningCLI config of one seed's run: the YAML, ``overrides``, the seed, the folders.

    Built as a pipeline stage's (:func:`~lightning_metakd.pipeline.stage_config`): the logger and
    checkpoints write into ``<out_dir>/seed_<seed>/``.
    """
    name = f"seed_{seed}"
    stages = {name: StageSpec(Path(config), expand_dotted(overrides))}
    spec = PipelineSpec(name=name, run_dir=out_dir, stages=stages)
    # The seed comes last, so that no override undoes it.
    return merge_config(stage_config(spec, name), seed_overrides(seed))


def _child_env() -> dict[str, str]:
    """The environment of a run's subprocess: this one, with this package first on the path."""
    package_root = str(Path(__file__).resolve().parent.parent)
    paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def run_one(run_dir: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Fit and test the ``stage_config.yaml`` of ``run_dir`` in this process; write ``done.json``."""
    from lightning_metakd.pipeline.stages import run_training_stage

    began = time.perf_counter()
    config = _read_yaml(run_dir / "stage_config.yaml", "The run's config")
    result = run_training_stage(run_dir.name, config, run_dir)
    marker = {
        **fields,
        "seconds": round(time.perf_counter() - began, 1),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **result,
    }
    write_json_atomic(run_dir / MARKER, marker)
    return marker


def _run_in_subprocess(run_dir: Path, fields: Mapping[str, Any]) -> None:
    command = [sys.executable, "-m", "lightning_metakd.seeds", "--run", str(run_dir),
               "--fields", json.dumps(dict(fields))]  # fmt: skip
    with open(run_dir / LOG, "wb") as log:
        code = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), check=False
        ).returncode
    if code != 0:
        tail = (run_dir / LOG).read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(
            f"the run in {run_dir} failed (exit status {code}); the end of {run_dir / LOG}:\n"
            + "\n".join(tail)
        )


def run_seeds(
    config: str | Path,
    seeds: Sequence[int],
    out_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    force: bool = False,
    isolate: bool = True,
    echo: Callable[[str], None] | None = None,
) -> SeedRuns:
    """Fit and test ``config`` once per seed; returns the runs (:meth:`SeedRuns.summary`).

    Writes ``<out_dir>/seed_<s>/`` per seed (see the module docstring) and ``<out_dir>/seeds.json``
    (the runs and their mean ± sd). Resumable: a seed whose ``done.json`` holds the same config
    (``inputs``: a digest of the run's whole LightningCLI config) is kept.

    Args:
        config: a LightningCLI YAML (``metakd fit --config``).
        seeds: the training seeds (:func:`seed_overrides`), e.g. ``[0, 1, 2]``.
        out_dir: the sweep's folder.
        overrides: dotted or nested config keys for every run, e.g.
            ``{"trainer.max_epochs": 2, "data.init_args.root": "~/data/omniglot"}``.
        name: how tables name this config (default: the config file's stem).
        force: rerun every seed.
        isolate: each run in a subprocess of its own (default); ``False`` runs them in this
            process (faster to start; tests, debugging).
        echo: where progress lines go (default: print, flushed).
    """
    say = echo or (lambda line: print(line, flush=True))
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, at least one; got {seeds}.")
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"No config at {config}; pass a `metakd fit` YAML.")
    out = Path(out_dir).expanduser().resolve()
    overrides = dict(overrides or {})
    result = SeedRuns(name or config.stem, config, out, overrides)
    for index, seed in enumerate(seeds, start=1):
        stage, run_dir = f"seed_{seed}", out / f"seed_{seed}"
        lightning_config = run_config(seed, config, out, overrides)
        inputs = _digest(lightning_config)
        marker = read_marker(out, stage)
        where = f"[sweep] {result.name}: seed {seed} ({index}/{len(seeds)})"
        if marker is not None and marker.get("inputs") == inputs and not force:
            say(f"{where} skipped (finished; {MARKER})")
        else:
            say(f"{where} running in {run_dir}")
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a half-written or outdated run starts clean
            run_dir.mkdir(parents=True)
            (run_dir / "stage_config.yaml").write_text(
                yaml.safe_dump(lightning_config, sort_keys=False)
            )
            fields = {"stage": stage, "seed": seed, "inputs": inputs}
            if isolate:
                _run_in_subprocess(run_dir, fields)
            else:
                run_one(run_dir, fields)
            marker = read_marker(out, stage)
            if marker is None:
                raise RuntimeError(f"the run in {run_dir} finished without writing {MARKER}.")
            say(f"{where} done in {marker['seconds']:.0f} s: {_accuracy(marker)}")
        result.runs.append(SeedRun(seed, run_dir, marker))
    write_json_atomic(out / "seeds.json", result.to_json())
    return result


def _accuracy(marker: Mapping[str, Any]) -> str:
    test = marker.get("test", {})
    return f"test/acc {100 * test['test/acc']:.2f} ± {100 * test.get('test/acc_ci95', 0):.2f}%"


def _pm(mean: float, sd: float | None) -> str:
    return f"{100 * mean:.2f} ± {100 * sd:.2f}" if sd is not None else f"{100 * mean:.2f}"


def sweep_table(results: Sequence[SeedRuns]) -> str:
    """A Markdown table: per config, mean ± sd over seeds, the runs' mean 95% CI, each seed.

    Example:
        >>> runs = SeedRuns("a", Path("a.yaml"), Path("out"))
        >>> runs.runs = [SeedRun(s, Path(), {"checkpoint": "", "test": {"test/acc": a,
        ...              "test/acc_ci95": 0.01}}) for s, a in [(0, 0.9), (1, 0.8), (2, 1.0)]]
        >>> print(sweep_table([runs]))
        | run | seeds | accuracy (%), mean ± sd over seeds | per-run 95% CI (points) | per seed (%) |
        |---|---:|---:|---:|---|
        | a | 3 | 90.00 ± 10.00 | ± 1.00 | 90.00, 80.00, 100.00 |
        <BLANKLINE>
    """
    lines = [
        "| run | seeds | accuracy (%), mean ± sd over seeds | per-run 95% CI (points) "
        "| per seed (%) |",
        "|---|---:|---:|---:|---|",
    ]
    for result in results:
        s = result.summary()
        per_seed = ", ".join(f"{100 * a:.2f}" for a in s["per_seed"].values())
        lines.append(
            f"| {s['name']} | {len(s['seeds'])} | {_pm(s['accuracy'], s['accuracy_sd'])} | "
            f"± {100 * s['ci95']:.2f} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def paired_over_seeds(
    reference: SeedRuns,
    other: SeedRuns,
    out_dir: str | Path,
    data: Mapping[str, Any] | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """The paired per-episode difference ``other − reference``, per seed, then over seeds.

    For every seed both sweeps ran, the two checkpoints' learners (a distillation checkpoint: its
    student) answer the same fixed test episodes in :func:`lightning_metakd.report.compare`,
    which gives the mean per-episode difference and its 95% CI; over seeds, their mean ± sample
    sd. The episodes are those of ``data`` (a ``data:`` section), by default the reference's
    resolved data — one data module for every seed, so every seed answers the same episodes.

    Writes ``<out_dir>/seed_<s>/report.{json,md}`` (compare's rows) and ``<out_dir>/paired.json``.

    Returns:
        ``{"reference", "other", "per_seed": [{"seed", "reference_accuracy", "other_accuracy",
        "diff", "diff_ci95"}], "summary": {"seeds", "diff", "diff_sd", "diff_ci95"}}`` (fractions;
        ``diff_ci95``: the mean over seeds of the per-seed CI half-widths).
    """
    from lightning_metakd.modules import load_learner
    from lightning_metakd.report import compare, report_datamodule

    if reference.name == other.name:
        raise ValueError(
            f"both sweeps are named {reference.name!r}; give run_seeds(..., name=) two names."
        )
    mine = {run.seed: run for run in other.runs}
    seeds = [run.seed for run in reference.runs if run.seed in mine]
    if not seeds:
        raise ValueError(
            f"{reference.name!r} (seeds {reference.seeds}) and {other.name!r} (seeds "
            f"{other.seeds}) share no seed; run both with the same seeds."
        )
    datamodule = report_datamodule(data if data is not None else reference.data_config())
    datamodule.prepare_data()
    out = Path(out_dir)
    theirs = {run.seed: run for run in reference.runs}
    per_seed = []
    for seed in seeds:
        learners = {
            reference.name: load_learner(theirs[seed].checkpoint),
            other.name: load_learner(mine[seed].checkpoint),
        }
        rows = compare(learners, datamodule, out / f"seed_{seed}", warmup=0, repeats=repeats,
                       plot=False, reference=reference.name)  # fmt: skip
        per_seed.append(
            {"seed": seed, "reference_accuracy": rows[0]["accuracy"],
             "other_accuracy": rows[1]["accuracy"], "diff": rows[1]["diff_vs_reference"],
             "diff_ci95": rows[1]["diff_ci95"]}
        )  # fmt: skip
    diff, sd = mean_sd([p["diff"] for p in per_seed])
    result = {
        "reference": reference.name,
        "other": other.name,
        "per_seed": per_seed,
        "summary": {
            "seeds": seeds,
            "diff": diff,
            "diff_sd": sd,
            "diff_ci95": mean_sd([p["diff_ci95"] for p in per_seed])[0],
        },
    }
    write_json_atomic(out / "paired.json", result)
    return result


def paired_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`paired_over_seeds` results, in percentage points.

    Example:
        >>> print(paired_table([{"reference": "a", "other": "b", "per_seed": [], "summary": {
        ...     "seeds": [0, 1], "diff": 0.02, "diff_sd": 0.005, "diff_ci95": 0.01}}]))
        | run | vs | seeds | Δ (points, paired), mean ± sd over seeds | per-seed 95% CI (points) |
        |---|---|---:|---:|---:|
        | b | a | 2 | +2.00 ± 0.50 | ± 1.00 |
        <BLANKLINE>
    """
    lines = [
        "| run | vs | seeds | Δ (points, paired), mean ± sd over seeds | per-seed 95% CI (points) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        s = r["summary"]
        sd = f" ± {100 * s['diff_sd']:.2f}" if s["diff_sd"] is not None else ""
        lines.append(
            f"| {r['other']} | {r['reference']} | {len(s['seeds'])} | {100 * s['diff']:+.2f}{sd} | "
            f"± {100 * s['diff_ci95']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["trainer.max_epochs=2", ...]`` → ``{"trainer.max_epochs": 2}`` (values read as YAML).

    Example:
        >>> parse_sets(["trainer.max_epochs=2", "data.init_args.root=~/data/omniglot"])
        {'trainer.max_epochs': 2, 'data.init_args.root': '~/data/omniglot'}
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. --set trainer.max_epochs=2.")
        out[key] = yaml.safe_load(value)
    return out


def config_overrides(items: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--set [NAME:]KEY=VALUE`` items → ``{config name: overrides}``; no ``NAME:``: every config.

    Example:
        >>> config_overrides(["trainer.max_epochs=2", "kd:model.init_args.teacher=t.ckpt"],
        ...                  ["base", "kd"])
        {'base': {'trainer.max_epochs': 2}, 'kd': {'trainer.max_epochs': 2, 'model.init_args.teacher': 't.ckpt'}}
    """
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in items:
        name, colon, rest = item.partition(":")
        if colon and "=" not in name:
            if name not in out:
                raise ValueError(
                    f"--set {item!r}: {name!r} is not one of the configs {list(names)}."
                )
            out[name].update(parse_sets([rest]))
        else:
            for overrides in out.values():
                overrides.update(parse_sets([item]))
    return out


def sweep_main(argv: list[str]) -> int:
    """``metakd sweep``: every ``--config`` once per seed, mean ± sd, paired Δ vs the first."""
    from lightning_metakd.command_line import fail, sweep_parser

    opts = sweep_parser().parse_args(argv)
    try:
        entries = []
        for spec in opts.config:
            name, sep, path = spec.partition("=")
            name, path = (name, path) if sep else (Path(spec).stem, spec)
            entries.append((name, Path(path)))
        names = [name for name, _ in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"two configs are named alike ({names}); name them NAME=YAML.")
        overrides = config_overrides(opts.set, names)
        out = Path(opts.out or Path("runs") / "sweep" / names[0])
        results = [
            run_seeds(path, opts.seeds, out / name, overrides[name], name=name, force=opts.force)
            for name, path in entries
        ]
        paired = [paired_over_seeds(results[0], r, out / "paired" / r.name) for r in results[1:]]
    except (OSError, ValueError, RuntimeError, PipelineConfigError) as err:
        return fail("metakd sweep", err)
    table = sweep_table(results) + ("\n" + paired_table(paired) if paired else "")
    write_json_atomic(
        out / "sweep.json", {"runs": [r.to_json() for r in results], "paired": paired}
    )
    (out / "sweep.md").write_text(table)
    print(table, end="")
    print(f"written {out / 'sweep.json'}, sweep.md")
    return 0


def _worker_main(argv: list[str]) -> int:
    """``python -m lightning_metakd.seeds --run <run_dir> --fields <json>``: one run (internal)."""
    parser = argparse.ArgumentParser(prog="python -m lightning_metakd.seeds")
    parser.add_argument("--run", required=True)
    parser.add_argument("--fields", required=True)
    opts = parser.parse_args(argv)
    run_one(Path(opts.run), json.loads(opts.fields))
    return 0


__all__ = [
    "SeedRun",
    "SeedRuns",
    "config_overrides",
    "mean_sd",
    "paired_over_seeds",
    "paired_table",
    "parse_sets",
    "run_config",
    "run_one",
    "run_seeds",
    "seed_overrides",
    "sweep_main",
    "sweep_table",
]

if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

"""What a sweep over training seeds measured: mean ± sd over seeds beside each run's own CI.

A run's ``test/acc_ci95`` says how precisely its fixed test episodes pin *that run's* accuracy;
the seed-to-seed standard deviation says how much the accuracy moves when the model is trained
again (:mod:`lightning_metakd.seeds` runs the seeds). :class:`SeedRuns` holds one config's runs
and their :meth:`~SeedRuns.summary`; :func:`paired_over_seeds` takes the *paired* per-episode
difference of two configs (:func:`lightning_metakd.report.compare`) seed by seed, then its
mean ± sd over seeds; :func:`sweep_table` and :func:`paired_table` print both as Markdown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_metakd.pipeline.config import _read_yaml
from lightning_metakd.pipeline.run import write_json_atomic


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
    """A config run once per seed (:func:`~lightning_metakd.seeds.run_seeds`): the runs and their mean ± sd."""

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


__all__ = [
    "SeedRun",
    "SeedRuns",
    "mean_sd",
    "paired_over_seeds",
    "paired_table",
    "sweep_table",
]

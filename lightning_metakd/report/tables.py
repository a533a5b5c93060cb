"""The report's Markdown tables (comparison, ablation) and its plot."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def markdown_table(rows: list[Mapping[str, Any]]) -> str:
    """The Markdown table of :func:`compare`'s rows (accuracy in %, FLOPs in millions).

    The column ``Δ vs <reference> (points, paired)`` shows the paired accuracy difference against
    the reference learner (the row whose ``diff_vs_reference`` is ``None``), mean ± 95% CI in
    percentage points, e.g. ``+0.35 ± 0.21``: the same test episodes make it a per-episode
    difference, whose CI is much narrower than the accuracies' (see :func:`compare`). The
    reference's row, and every row of rows without the diff keys, shows ``—``. ``normalization``
    is the statistics the learner's BatchNorm layers normalise test episodes with.

    Example:
        >>> row = {"parameters": 516, "flops": 2e6, "latency_ms": 1.0}
        >>> print(markdown_table([
        ...     {"name": "a", "accuracy": 0.5, "ci95": 0.02, **row,
        ...      "diff_vs_reference": None, "diff_ci95": None},
        ...     {"name": "b", "accuracy": 0.51, "ci95": 0.02, **row,
        ...      "diff_vs_reference": 0.0035, "diff_ci95": 0.0021}]))
        | learner | normalization | accuracy (%) | Δ vs a (points, paired) | parameters | MFLOPs / episode | CPU latency (ms) |
        |---|---|---:|---:|---:|---:|---:|
        | a | — | 50.00 ± 2.00 | — | 516 | 2.00 | 1.00 |
        | b | — | 51.00 ± 2.00 | +0.35 ± 0.21 | 516 | 2.00 | 1.00 |
        <BLANKLINE>
    """
    reference = next(
        (r["name"] for r in rows if "diff_vs_reference" in r and r["diff_vs_reference"] is None),
        rows[0]["name"] if rows else "",
    )
    lines = [
        f"| learner | normalization | accuracy (%) | Δ vs {reference} (points, paired) | "
        "parameters | MFLOPs / episode | CPU latency (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = r.get("diff_vs_reference")
        paired = "—" if diff is None else f"{100 * diff:+.2f} ± {100 * r['diff_ci95']:.2f}"
        lines.append(
            f"| {r['name']} | {r.get('normalization') or '—'} | "
            f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} | {paired} | "
            f"{r['parameters']:,} | {r['flops'] / 1e6:.2f} | {r['latency_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def ablation(
    runs: Mapping[str, Mapping[str, float]],
    baseline: str | None = None,
    metric: str = "test/acc",
    ci: str = "test/acc_ci95",
) -> str:
    """A Markdown table of distillation runs: accuracy ± CI and the change against ``baseline``.

    Args:
        runs: ``{run name: result dict}``, e.g. ``{"task only": {...}, "+ soft": {...},
            "all terms": {...}}`` where each dict is what ``Trainer.test`` returned.
        baseline: the run the others are compared with (default: the first).
        metric, ci: the keys of the accuracy and its 95% CI half-width in the result dicts.

    Example:
        >>> print(ablation({"task": {"test/acc": 0.5, "test/acc_ci95": 0.01},
        ...                 "soft": {"test/acc": 0.55, "test/acc_ci95": 0.01}}))
        | run | accuracy (%) | Δ vs task (points) |
        |---|---:|---:|
        | task | 50.00 ± 1.00 | +0.00 |
        | soft | 55.00 ± 1.00 | +5.00 |
        <BLANKLINE>
    """
    if not runs:
        raise ValueError("ablation needs at least one run: {name: result dict}.")
    missing = [n for n, r in runs.items() if metric not in r or ci not in r]
    if missing:
        raise KeyError(f"runs {missing} have no {metric!r} and {ci!r}; pass Trainer.test results.")
    baseline = next(iter(runs)) if baseline is None else baseline
    if baseline not in runs:
        raise KeyError(f"baseline {baseline!r} is not one of the runs {list(runs)}.")
    reference = runs[baseline][metric]
    lines = [f"| run | accuracy (%) | Δ vs {baseline} (points) |", "|---|---:|---:|"]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {100 * r[metric]:.2f} ± {100 * r[ci]:.2f} | "
            f"{100 * (r[metric] - reference):+.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_pyplot():  # noqa: ANN201 - matplotlib.pyplot
    """matplotlib's pyplot on the Agg backend, or an ImportError that says how to get it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "report.png needs matplotlib (a dependency of lightning-metakd: reinstall it, or "
            "`pip install matplotlib`), or call compare(..., plot=False)."
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_report(pyplot, rows: list[Mapping[str, Any]], path: Path) -> None:  # noqa: ANN001
    """``report.png``: each row's accuracy with its 95% CI against its parameters (log scale)."""
    figure, axes = pyplot.subplots(figsize=(5, 4))
    for r in rows:
        axes.errorbar(
            r["parameters"], 100 * r["accuracy"], yerr=100 * r["ci95"], fmt="o", capsize=3
        )
        axes.annotate(r["name"], (r["parameters"], 100 * r["accuracy"]), xytext=(4, 4),
                      textcoords="offset points")  # fmt: skip
    axes.set_xscale("log")
    # Minor log ticks get labels like 3x10^3 that overlap; label decades only.
    axes.xaxis.set_minor_formatter(pyplot.NullFormatter())
    axes.set_xlabel("parameters")
    axes.set_ylabel("test accuracy (%)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


__all__ = ["ablation", "markdown_table", "plot_pyplot", "plot_report"]

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


def episode_setting(
    ways: int, shots: int, episodes: int, queries: int | None = None, within: str | None = None
) -> str:
    """The test setting in words, the title of ``report.png``.

    ``within`` names the class group every task is drawn from (the data module's ``group_name``
    when ``grouping`` is on): within-group tasks are much harder than tasks across groups.

    Example:
        >>> episode_setting(5, 1, 600, queries=15)
        '5-way 1-shot, 600 test episodes, 15 queries per class'
        >>> episode_setting(10, 1, 600, within="radical")
        '10-way 1-shot within a radical, 600 test episodes'
    """
    setting = f"{ways}-way {shots}-shot" + (f" within a {within}" if within else "")
    text = f"{setting}, {episodes:,} test episode{'s' * (episodes != 1)}"
    return text if queries is None else f"{text}, {queries} queries per class"


def parameter_count(value: float, _position: object = None) -> str:
    """A parameter count as a short tick label: ``500``, ``2k``, ``10k``, ``1.5M``.

    Example:
        >>> [parameter_count(v) for v in (500, 2_000, 10_000, 250_000, 1_500_000)]
        ['500', '2k', '10k', '250k', '1.5M']
    """
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def plot_report(
    pyplot,  # noqa: ANN001 - matplotlib.pyplot (plot_pyplot)
    rows: list[Mapping[str, Any]],
    path: Path,
    setting: str = "",
) -> None:
    """``report.png``: each row's accuracy with its 95% CI against its parameters (log scale).

    The title is the test ``setting`` (:func:`episode_setting`); the x axis is labelled at 1, 2
    and 5 times each power of ten in short counts (:func:`parameter_count`); each learner has its
    own colour and marker, named in a legend under the axes with its accuracy and size, so names
    never overlap however close the points are (a distilled student and its baseline share a
    parameter count).
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure, axes = pyplot.subplots(figsize=(6, 4.5 + 0.25 * len(rows)))
    markers = "osD^vP*Xhp"
    for k, r in enumerate(rows):
        accuracy, ci95 = 100 * r["accuracy"], 100 * r["ci95"]
        size = parameter_count(r["parameters"])
        label = f"{r['name']}: {accuracy:.2f} ± {ci95:.2f}%, {size} parameters"
        axes.errorbar(r["parameters"], accuracy, yerr=ci95, fmt=markers[k % len(markers)],
                      capsize=4, markersize=7, label=label)  # fmt: skip
    counts = [r["parameters"] for r in rows]
    axes.set_xscale("log")
    axes.set_xlim(min(counts) / 1.8, max(counts) * 1.8)
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    axes.xaxis.set_major_formatter(FuncFormatter(parameter_count))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("parameters (log scale)")
    axes.set_ylabel("test accuracy (%), 95% CI")
    axes.set_title(f"Accuracy against size\n{setting}" if setting else "Accuracy against size")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False, fontsize=9)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    pyplot.close(figure)


__all__ = [
    "ablation",
    "episode_setting",
    "markdown_table",
    "parameter_count",
    "plot_pyplot",
    "plot_report",
]

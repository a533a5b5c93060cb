"""The comparison report: accuracy, size, FLOPs and latency of learners on the same test episodes.

:func:`compare` answers the question distillation is for — how much accuracy does a smaller
student keep for how much less compute — with every learner measured on the same fixed test
episodes; :func:`ablation` formats a table of distillation runs (each loss term alone, all
together) from their results. :func:`distillation_learners` names the rows of a distillation run:
the teacher and the distilled student or, with several teachers, each teacher, their ensemble
(:class:`~lightning_metakd.modules.distillation.TeacherEnsemble`) and the student.

Because every learner answers the same episodes, "B beats A" is a *paired* question: per test
episode the accuracy difference ``acc_B − acc_A``, then its mean ± 95% CI. The episodes' own
difficulty moves both accuracies together and cancels in the difference, so its CI is much
narrower than the two learners' CIs: two learners whose CIs overlap can still differ
significantly. :func:`compare` reports that difference against a reference learner.

Example::

    rows = compare({"teacher": teacher, "student": distiller.student_learner()}, datamodule, "out")
    rows = compare(distillation_learners(distiller, baseline), datamodule, "out")
    print(open("out/report.md").read())
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_metakd.algorithms import Learner
from lightning_metakd.data import EpisodicDataModule
from lightning_metakd.distill import TeacherEnsemble, ensemble_weights
from lightning_metakd.evaluation import mean_ci95
from lightning_metakd.modules import Checkpoint, DistillationModule, read_checkpoint

#: What :func:`compare` measures: a learner, or several that vote.
Measured = Learner | TeacherEnsemble

COLUMNS = (
    "name",
    "accuracy",
    "ci95",
    "diff_vs_reference",
    "diff_ci95",
    "parameters",
    "flops",
    "latency_ms",
)


def _episode_cost(learner: Measured, support_x, support_y, query_x) -> None:
    """One adapted episode: adaptation on the support set, then prediction of the queries."""
    state = learner.adapt(support_x, support_y)
    learner.predict(state, query_x)


def measure(
    learner: Measured,
    datamodule: EpisodicDataModule,
    warmup: int = 2,
    repeats: int = 10,
) -> dict[str, Any]:
    """Accuracy ± 95% CI on the test episodes, parameter count, FLOPs and CPU latency per episode.

    - ``accuracy``, ``ci95``: :meth:`Learner.evaluate <lightning_metakd.algorithms.Learner.evaluate>` on every fixed test episode of
      ``datamodule`` (the same numbers as ``Trainer.test``), through
      :func:`~lightning_metakd.evaluation.mean_ci95`.
    - ``episode_accuracy``: those per-episode accuracies, a float tensor ``[episodes]`` in test
      order, for :func:`compare`'s paired differences (it strips them from its rows).
    - ``parameters``: elements of the adapted network's parameters (``learner.model``; the
      algorithm's own meta-parameters, e.g. Meta-SGD's learning rates, are not counted); for a
      :class:`~lightning_metakd.modules.distillation.TeacherEnsemble`, of every member's network.
    - ``flops``: :class:`torch.utils.flop_counter.FlopCounterMode` total over one adapted episode
      (the first test task: adaptation, inner-loop gradients included, and query prediction; an
      ensemble's members all adapt and predict).
    - ``latency_ms``: median wall-clock time of that episode over ``repeats`` runs after
      ``warmup`` runs, on the CPU (the learner is moved there).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}.")
    learner = learner.to("cpu").eval()
    datamodule.setup("test")
    accuracies, first = [], None
    for batch in datamodule.test_dataloader():
        accuracies.append(learner.evaluate(batch).accuracy)
        first = batch if first is None else first
    episode_accuracy = torch.cat(accuracies).detach().float().flatten()
    mean, ci95 = mean_ci95(episode_accuracy)
    task = (first.support_x[0], first.support_y[0], first.query_x[0])
    with FlopCounterMode(display=False) as counter:
        _episode_cost(learner, *task)
    for _ in range(warmup):
        _episode_cost(learner, *task)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _episode_cost(learner, *task)
        times.append(time.perf_counter() - start)
    return {
        "accuracy": mean,
        "ci95": ci95,
        "episode_accuracy": episode_accuracy,
        "parameters": sum(p.numel() for m in _models(learner) for p in m.parameters()),
        "flops": counter.get_total_flops(),
        "latency_ms": 1000 * statistics.median(times),
    }


def _models(learner: Measured) -> list[torch.nn.Module]:
    return learner.models if isinstance(learner, TeacherEnsemble) else [learner.model]


def compare(
    learners: Mapping[str, Measured],
    datamodule: EpisodicDataModule,
    out_dir: str | Path,
    warmup: int = 2,
    repeats: int = 10,
    plot: bool = True,
    reference: str | None = None,
) -> list[dict[str, Any]]:
    """Measure every learner (:func:`measure`) and write ``report.json``, ``report.md``, ``report.png``.

    Besides each learner's accuracy ± 95% CI, every row other than ``reference`` gets the *paired*
    difference against it: per test episode ``acc_row − acc_reference`` (both ``[episodes]``, the
    same fixed episodes), its mean and 95% CI half-width through
    :func:`~lightning_metakd.evaluation.mean_ci95`. Pairing removes the episodes' shared
    difficulty, so this CI is much narrower than the two accuracies' CIs; a difference is
    significant when its CI excludes 0, even where the two accuracies' CIs overlap.

    Args:
        learners: ``{name: learner}``, e.g. the teacher, the distilled student
            (``DistillationModule.student_learner()``) and an undistilled student of the same size
            (:func:`distillation_learners`); a
            :class:`~lightning_metakd.modules.distillation.TeacherEnsemble` counts as one learner.
        datamodule: the episodes; every learner sees the same fixed test episodes.
        out_dir: folder for the three files (created).
        warmup, repeats: latency runs (see :func:`measure`).
        plot: write ``report.png`` (accuracy with its 95% CI against parameters, log scale); needs
            matplotlib (the ``dev`` extra).
        reference: the name of the learner the paired differences are taken against (default:
            the first of ``learners``).

    Returns:
        One row per learner: ``{"name", "accuracy", "ci95", "diff_vs_reference", "diff_ci95",
        "parameters", "flops", "latency_ms"}`` (:data:`COLUMNS`), in the order of ``learners``;
        ``diff_vs_reference`` and ``diff_ci95`` are the mean paired accuracy difference
        ``acc_row − acc_reference`` and its 95% CI half-width (fractions, like ``accuracy``), and
        ``None`` in the reference's own row. The same rows are written to ``report.json`` (no
        per-episode accuracies, to keep it compact).

    Raises:
        KeyError: ``reference`` is not one of ``learners``.
    """
    if not learners:
        raise ValueError("compare needs at least one learner: {name: Learner}.")
    wrong = [n for n, m in learners.items() if not isinstance(m, Learner | TeacherEnsemble)]
    if wrong:
        raise TypeError(
            f"compare takes Learners (or TeacherEnsembles); {wrong} are not (a module's learner is "
            "module.learner; for a DistillationModule pass distillation_learners(it))."
        )
    reference = next(iter(learners)) if reference is None else reference
    if reference not in learners:
        raise KeyError(f"reference {reference!r} is not one of the learners {list(learners)}.")
    if plot:
        pyplot = _pyplot()
    measured = {name: measure(m, datamodule, warmup, repeats) for name, m in learners.items()}
    episodes = {name: m.pop("episode_accuracy") for name, m in measured.items()}
    rows = []
    for name, m in measured.items():
        diff, diff_ci95 = None, None
        if name != reference:
            if episodes[name].shape != episodes[reference].shape:
                raise ValueError(
                    f"{name!r} and {reference!r} were measured on different numbers of test "
                    f"episodes ({episodes[name].numel()} and {episodes[reference].numel()})."
                )
            diff, diff_ci95 = mean_ci95(episodes[name] - episodes[reference])
        row = {"name": name, "accuracy": m.pop("accuracy"), "ci95": m.pop("ci95")}
        rows.append({**row, "diff_vs_reference": diff, "diff_ci95": diff_ci95, **m})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "report.md").write_text(markdown_table(rows))
    if plot:
        _plot(pyplot, rows, out / "report.png")
    return rows


def distillation_learners(
    distiller: DistillationModule, baseline: Learner | None = None
) -> dict[str, Measured]:
    """The rows of a distillation report, for :func:`compare`, in order.

    One teacher: ``teacher``, ``distilled student`` (and ``baseline student``), the names of the
    pipeline's report. Several teachers: ``teacher <k> (<algorithm> <backbone>)`` for each, then
    ``ensemble of teachers`` — the teachers adapting on the same support set with their query
    probabilities averaged by ``teacher_weights``
    (:class:`~lightning_metakd.modules.distillation.TeacherEnsemble`) — then the students. The
    teachers are copies, so measuring (which moves learners to the CPU) leaves ``distiller`` as
    it is.

    Args:
        distiller: a :class:`~lightning_metakd.modules.DistillationModule` (its teachers loaded or
            loadable).
        baseline: the same student trained without distillation, if any.
    """
    teachers = [copy.deepcopy(t) for t in distiller.teacher_ensemble().learners]
    return _distillation_rows(
        teachers, distiller.teacher_weights, distiller.student_learner(), baseline
    )


def _distillation_rows(
    teachers: list[Learner],
    teacher_weights: list[float],
    student: Learner,
    baseline: Learner | None = None,
) -> dict[str, Measured]:
    if len(teachers) == 1:
        learners: dict[str, Measured] = {"teacher": teachers[0]}
    else:
        learners = {
            f"teacher {k} ({type(t.algorithm).__name__} {type(t.backbone).__name__})": t
            for k, t in enumerate(teachers)
        }
        learners["ensemble of teachers"] = TeacherEnsemble(teachers, teacher_weights)
    learners["distilled student"] = student
    if baseline is not None:
        learners["baseline student"] = baseline
    return learners


def markdown_table(rows: list[Mapping[str, Any]]) -> str:
    """The Markdown table of :func:`compare`'s rows (accuracy in %, FLOPs in millions).

    The column ``Δ vs <reference> (points, paired)`` shows the paired accuracy difference against
    the reference learner (the row whose ``diff_vs_reference`` is ``None``), mean ± 95% CI in
    percentage points, e.g. ``+0.35 ± 0.21``: the same test episodes make it a per-episode
    difference, whose CI is much narrower than the accuracies' (see :func:`compare`). The
    reference's row, and every row of rows without the diff keys, shows ``—``.

    Example:
        >>> row = {"parameters": 516, "flops": 2e6, "latency_ms": 1.0}
        >>> print(markdown_table([
        ...     {"name": "a", "accuracy": 0.5, "ci95": 0.02, **row,
        ...      "diff_vs_reference": None, "diff_ci95": None},
        ...     {"name": "b", "accuracy": 0.51, "ci95": 0.02, **row,
        ...      "diff_vs_reference": 0.0035, "diff_ci95": 0.0021}]))
        | learner | accuracy (%) | Δ vs a (points, paired) | parameters | MFLOPs / episode | CPU latency (ms) |
        |---|---:|---:|---:|---:|---:|
        | a | 50.00 ± 2.00 | — | 516 | 2.00 | 1.00 |
        | b | 51.00 ± 2.00 | +0.35 ± 0.21 | 516 | 2.00 | 1.00 |
        <BLANKLINE>
    """
    reference = next(
        (r["name"] for r in rows if "diff_vs_reference" in r and r["diff_vs_reference"] is None),
        rows[0]["name"] if rows else "",
    )
    lines = [
        f"| learner | accuracy (%) | Δ vs {reference} (points, paired) | parameters | "
        "MFLOPs / episode | CPU latency (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = r.get("diff_vs_reference")
        paired = "—" if diff is None else f"{100 * diff:+.2f} ± {100 * r['diff_ci95']:.2f}"
        lines.append(
            f"| {r['name']} | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} | {paired} | "
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


def _pyplot():
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


def _plot(pyplot, rows: list[Mapping[str, Any]], path: Path) -> None:
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


def checkpoint_learners(
    checkpoint: Checkpoint, baseline: Learner | None = None
) -> dict[str, Measured]:
    """The rows of a distillation checkpoint (its teachers, their ensemble, the student) for
    :func:`compare`, as :func:`distillation_learners` names them, read without building the module."""
    teachers = checkpoint.teachers()
    weights = ensemble_weights(checkpoint.hyper_parameters.get("teacher_weights"), len(teachers))
    return _distillation_rows(teachers, weights, checkpoint.student(), baseline)


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
        data = copy.deepcopy(config.get("data") or {})
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
        rows = compare(
            learners, datamodule, opts.out, repeats=opts.repeats, reference=opts.reference
        )
    except (OSError, ValueError, TypeError, KeyError) as err:
        print(f"metakd report: error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    print(f"written {Path(opts.out) / 'report.json'}, report.md, report.png")
    return 0


__all__ = [
    "COLUMNS",
    "Measured",
    "ablation",
    "checkpoint_learners",
    "compare",
    "distillation_learners",
    "markdown_table",
    "measure",
    "report_datamodule",
]

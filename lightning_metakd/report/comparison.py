"""Measuring learners on the same fixed test episodes: accuracy, paired differences, size, FLOPs, latency."""

from __future__ import annotations

import copy
import hashlib
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
from lightning_metakd.modules import Checkpoint, DistillationModule
from lightning_metakd.report.tables import episode_setting, markdown_table, plot_pyplot, plot_report

#: What :func:`compare` measures: a learner, or several that vote.
Measured = Learner | TeacherEnsemble

COLUMNS = (
    "name",
    "normalization",
    "accuracy",
    "ci95",
    "diff_vs_reference",
    "diff_ci95",
    "parameters",
    "flops",
    "latency_ms",
)


def _episode_cost(learner: Measured, support_x, support_y, query_x) -> None:
    """One adapted episode as the test episodes are evaluated (each learner's own normalisation
    policy): adaptation on the support set, then prediction of the queries."""
    members = learner.learners if isinstance(learner, TeacherEnsemble) else [learner]
    states = [m.adapt(support_x, support_y, m.normalization) for m in members]
    if isinstance(learner, TeacherEnsemble):
        learner.predict(states, query_x)
    else:
        learner.predict(states[0], query_x)


def episode_accuracies(learner: Measured, datamodule: EpisodicDataModule) -> torch.Tensor:
    """The learner's accuracy on each fixed test episode of ``datamodule``: float ``[episodes]``
    in test order (:meth:`Learner.evaluate <lightning_metakd.algorithms.Learner.evaluate>`)."""
    learner = learner.to("cpu").eval()
    datamodule.setup("test")
    accuracies = [learner.evaluate(batch).accuracy for batch in datamodule.test_dataloader()]
    return torch.cat(accuracies).detach().float().flatten()


def learner_digest(learner: Measured) -> str:
    """A digest of what a learner's test accuracies depend on: its classes, normalisation policy
    and every tensor of its state (an ensemble: its members' and weights). The population
    statistics a learner may carry (``population.*``, ``calibrated``) count only under the
    ``population`` policy, the one that reads them: a distillation checkpoint's teacher that has
    them digests like the teacher stage's checkpoint that has not."""
    digest = hashlib.sha256()
    members = learner.learners if isinstance(learner, TeacherEnsemble) else [learner]
    if isinstance(learner, TeacherEnsemble):
        digest.update(repr(list(learner.weights)).encode())
    for member in members:
        digest.update(
            f"{type(member.algorithm).__qualname__}:{type(member.model).__qualname__}:"
            f"{member.normalization}".encode()
        )
        for name, tensor in member.state_dict().items():
            if member.normalization != "population" and name.split(".")[0] in (
                "population",
                "calibrated",
            ):
                continue
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def episodes_digest(datamodule: EpisodicDataModule) -> str:
    """A digest of the fixed test episodes: the split's classes and images and every task's
    support and query indices (two data modules with equal digests test alike)."""
    datamodule.setup("test")
    dataset = datamodule.splits["test"]
    digest = hashlib.sha256(repr(list(dataset.class_names)).encode())
    digest.update(dataset.images.contiguous().numpy().tobytes())
    tasks = datamodule.sampler("test").global_tasks()
    digest.update(repr([(t.classes, t.support, t.query) for t in tasks]).encode())
    return digest.hexdigest()


def measure(
    learner: Measured,
    datamodule: EpisodicDataModule,
    warmup: int = 2,
    repeats: int = 10,
    episode_accuracy: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Accuracy ± 95% CI on the test episodes, parameter count, FLOPs and CPU latency per episode.

    - ``normalization``: the learner's normalisation policy (the statistics its BatchNorm
      layers normalise test episodes with, :data:`~lightning_metakd.algorithms.POLICIES`).
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

    ``episode_accuracy``: the per-episode accuracies if already measured on these episodes
    (:func:`episode_accuracies`, e.g. in another process while something else ran); then only
    the size, FLOPs and latency are measured here.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}.")
    if episode_accuracy is None:
        episode_accuracy = episode_accuracies(learner, datamodule)
    learner = learner.to("cpu").eval()
    datamodule.setup("test")
    # the class's loader: a progress bar that counts the instance's (episode_progress) counts
    # only the accuracies' pass; the fixed test episodes come in the same order from either
    first = next(iter(type(datamodule).test_dataloader(datamodule)))
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
        "normalization": _normalization(learner),
        "accuracy": mean,
        "ci95": ci95,
        "episode_accuracy": episode_accuracy,
        "parameters": sum(p.numel() for m in _models(learner) for p in m.parameters()),
        "flops": counter.get_total_flops(),
        "latency_ms": 1000 * statistics.median(times),
    }


def _normalization(learner: Measured) -> str:
    """The learner's normalisation policy; an ensemble's, or its members' joined by ``+``."""
    if isinstance(learner, TeacherEnsemble):
        return "+".join(dict.fromkeys(m.normalization for m in learner.learners))
    return learner.normalization


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
    known_accuracies: Mapping[str, torch.Tensor] | None = None,
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
        known_accuracies: ``{name: per-episode accuracies}`` already measured on these episodes
            (:func:`episode_accuracies`); those learners are not evaluated again.

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
        pyplot = plot_pyplot()
    known = known_accuracies or {}
    measured = {
        name: measure(m, datamodule, warmup, repeats, known.get(name))
        for name, m in learners.items()
    }
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
        row = {
            "name": name,
            "normalization": m.pop("normalization"),
            "accuracy": m.pop("accuracy"),
            "ci95": m.pop("ci95"),
        }
        rows.append({**row, "diff_vs_reference": diff, "diff_ci95": diff_ci95, **m})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "report.md").write_text(markdown_table(rows))
    if plot:
        dm, count = datamodule, episodes[reference].numel()
        within = None if dm.grouping == "none" else dm.group_name
        setting = episode_setting(dm.test_ways, dm.test_shots, count, dm.test_queries, within)
        plot_report(pyplot, rows, out / "report.png", setting)
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


def checkpoint_learners(
    checkpoint: Checkpoint, baseline: Learner | None = None
) -> dict[str, Measured]:
    """The rows of a distillation checkpoint (its teachers, their ensemble, the student) for
    :func:`compare`, as :func:`distillation_learners` names them, read without building the module."""
    teachers = checkpoint.teachers()
    weights = ensemble_weights(checkpoint.hyper_parameters.get("teacher_weights"), len(teachers))
    return _distillation_rows(teachers, weights, checkpoint.student(), baseline)


__all__ = [
    "COLUMNS",
    "Measured",
    "checkpoint_learners",
    "compare",
    "episode_accuracies",
    "learner_digest",
    "episodes_digest",
    "distillation_learners",
    "measure",
]

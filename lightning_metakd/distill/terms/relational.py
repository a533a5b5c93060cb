"""Relational knowledge distillation (Park et al. 2019): the geometry of the query embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_metakd.algorithms import Learner
from lightning_metakd.algorithms.learner import scored
from lightning_metakd.distill.taps import check_paths, tap_points
from lightning_metakd.distill.term import (
    DistillationTerm,
    TaskContext,
    check_weight,
    probe,
    teacher_name,
)

#: Distances below ``sqrt(EPS)`` count as ``sqrt(EPS)``: keeps the gradient of ``‖x‖`` finite at 0.
EPS = 1e-12


def _points(embeddings: Tensor, least: int, what: str) -> Tensor:
    """``[N, ...]`` → ``[N, D]`` float, with at least ``least`` rows."""
    if not isinstance(embeddings, Tensor) or embeddings.dim() < 2:
        got = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings)
        raise ValueError(f"{what} must be embeddings [N, ...] (one row per sample), got {got}.")
    if embeddings.shape[0] < least:
        raise ValueError(
            f"{what} has {embeddings.shape[0]} samples but this relation needs at least {least} "
            f"({'pairs' if least == 2 else 'triangles'} of distinct samples); give the task more "
            "queries (or classes)."
        )
    return scored(embeddings.flatten(1))


def distance_potentials(embeddings: Tensor) -> Tensor:
    """``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ`` for every pair: ``[N, D]`` → ``[N, N]`` (eq. 4).

    ``μ`` is the mean distance over the ``N(N−1)`` ordered pairs ``i ≠ j``, so the potentials are
    free of the embedding's scale (and, being distances, of its width and of rotations and
    translations). The diagonal is 0.

    Example:
        >>> import torch
        >>> distance_potentials(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]))
        tensor([[0.0000, 0.7500, 1.0000],
                [0.7500, 0.0000, 1.2500],
                [1.0000, 1.2500, 0.0000]])
    """
    x = _points(embeddings, 2, "embeddings")
    n = x.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    distances = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(-1).clamp_min(EPS).sqrt() * off
    mean = distances.sum() / (n * (n - 1))
    return distances / mean.clamp_min(EPS)


def angle_potentials(embeddings: Tensor) -> Tensor:
    """``ψ_A(t_i, t_j, t_k) = ⟨e_ij, e_kj⟩``, the cosine of the angle at ``t_j`` (eq. 6-7).

    ``e_ij = (t_i − t_j) / ‖t_i − t_j‖₂``. Returned as ``[N, N, N]`` indexed ``[j, i, k]`` (the
    vertex first); entries with ``i = j`` or ``k = j`` are 0.

    Example:
        >>> import torch
        >>> right = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # a right angle at point 0
        >>> round(float(angle_potentials(right)[0, 1, 2]), 6), round(float(angle_potentials(right)[1, 0, 2]), 4)
        (0.0, 0.7071)
    """
    x = _points(embeddings, 2, "embeddings")
    differences = x.unsqueeze(0) - x.unsqueeze(1)  # [j, i] = t_i − t_j
    norms = differences.pow(2).sum(-1, keepdim=True).clamp_min(EPS).sqrt()
    units = differences / norms
    return units @ units.transpose(1, 2)


def _huber(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    losses = F.smooth_l1_loss(student, teacher, reduction="none", beta=1.0)
    return (losses * mask).sum() / mask.sum()


def rkd_distance_loss(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    """RKD-D (Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation", CVPR, eq. 4-5).

    ``mean_{i≠j} l_δ(ψ_D(t_i, t_j), ψ_D(s_i, s_j))``: the student's pairwise distances, each
    divided by their mean (:func:`distance_potentials`), against the teacher's, under the Huber
    loss ``l_δ`` with ``δ = 1`` (½x² for ``|x| ≤ 1``, ``|x| − ½`` beyond). The paper sums over the
    pairs of a batch; the mean over the ``N(N−1)`` ordered pairs ``i ≠ j`` keeps the value
    independent of the number of samples (the authors' code averages over all ``N²`` entries,
    diagonal included: ``(N−1)/N`` times this). Widths may differ: only distances are compared.

    Shapes: ``[N, ...]`` each (flattened to ``[N, D_s]`` and ``[N, D_t]``), ``N ≥ 2``, row ``i``
    the same sample in both. Returns a scalar.

    Example:
        >>> import torch
        >>> t = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
        >>> float(rkd_distance_loss(5 * t, t))  # a scaled copy has the same relations
        0.0
    """
    s, t = _pair(student_embeddings, teacher_embeddings, 2)
    n = s.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)
    return _huber(distance_potentials(s), distance_potentials(t), off.to(s.dtype))


def rkd_angle_loss(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    """RKD-A (Park et al. 2019, eq. 6-7): the angles of every triangle of samples, under Huber.

    ``mean_{i,j,k distinct} l_δ(ψ_A(t_i, t_j, t_k), ψ_A(s_i, s_j, s_k))`` with ``ψ_A`` the cosine of
    the angle at ``j`` (:func:`angle_potentials`) and ``δ = 1``; averaged over the
    ``N(N−1)(N−2)`` ordered triples of distinct samples (the paper sums; degenerate triples carry
    no angle). Width-free, and free of scale, rotation and translation.

    Shapes: ``[N, ...]`` each, ``N ≥ 3``. Returns a scalar.

    Example:
        >>> import torch
        >>> t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])  # angles 45°, 90°, 45°
        >>> round(float(rkd_angle_loss(s, t)), 4)  # ½(cos 45° − cos 90°)² on 4 of 6 angles
        0.1667
    """
    s, t = _pair(student_embeddings, teacher_embeddings, 3)
    n = s.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))  # j≠i, j≠k, i≠k
    return _huber(angle_potentials(s), angle_potentials(t), distinct.to(s.dtype))


def _pair(student: Tensor, teacher: Tensor, least: int) -> tuple[Tensor, Tensor]:
    s = _points(student, least, "student_embeddings")
    t = _points(teacher, least, "teacher_embeddings")
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"student_embeddings has {s.shape[0]} samples but teacher_embeddings {t.shape[0]}; "
            "relations compare the same samples, row for row (widths may differ)."
        )
    return s, t


def relation_weights(
    distance_weight: float, angle_weight: float, term: str | None = None
) -> tuple[float, float]:
    """``(λ_D, λ_A)``, each checked by :func:`~lightning_metakd.distill.term.check_weight`, not both 0.

    Two zero weights leave no relation to match; the message names ``term`` (the distillation term
    that was given them), or :func:`relational_loss` when it is ``None``.

    Example:
        >>> relation_weights(1, 2.0)
        (1.0, 2.0)
    """
    distance_weight = check_weight(distance_weight, "distance_weight")
    angle_weight = check_weight(angle_weight, "angle_weight")
    if not distance_weight and not angle_weight:
        raise ValueError(
            f"{term} got distance_weight=0 and angle_weight=0, so it matches nothing; give one "
            "of them a positive weight, or switch the term off with weight=0."
            if term is not None
            else "distance_weight and angle_weight are both 0, so there is no relation to match; "
            "give one of them a positive weight (the term's own weight=0 switches it off)."
        )
    return distance_weight, angle_weight


def relational_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    distance_weight: float = 1.0,
    angle_weight: float = 2.0,
) -> Tensor:
    """``λ_D · RKD-D + λ_A · RKD-A`` (Park et al. 2019, eq. 3 with both potentials).

    A weight of 0 skips its potential (the angle-wise one costs ``O(N³)``). The paper's metric
    learning experiments use ``λ_D = 1, λ_A = 2`` (the defaults), its classification ones
    ``25, 50``.

    Example:
        >>> import torch
        >>> t = torch.randn(6, 8, dtype=torch.float64)
        >>> rotation = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
        >>> float(relational_loss(3 * t @ rotation + 1, t)) < 1e-20  # same shape, other pose
        True
    """
    distance_weight, angle_weight = relation_weights(distance_weight, angle_weight)
    total = student_embeddings.new_zeros((), dtype=scored(student_embeddings).dtype)
    if distance_weight:
        total = total + distance_weight * rkd_distance_loss(student_embeddings, teacher_embeddings)
    if angle_weight:
        total = total + angle_weight * rkd_angle_loss(student_embeddings, teacher_embeddings)
    return total


class RelationalKD(DistillationTerm):
    """Relational KD on the query embeddings after adaptation (Park et al. 2019, CVPR).

    Instead of matching each query's embedding (which needs equal widths or a projector), the
    student matches the *structure* of the task's query set in the teacher's embedding: the
    pairwise distances normalised by their mean (RKD-D, eq. 4-5) and the angles of every triangle
    of queries (RKD-A, eq. 6-7), both under the Huber loss (:func:`relational_loss`). Relations are
    width-free, so a Conv4-16 student learns from a Conv4-64 or ResNet12 teacher without a
    projector; and they are what a metric learner's decisions depend on (ProtoNet and MatchingNet
    classify by distances and angles between embeddings).

    The embeddings are the student's and each teacher's tapped layer on the query forward pass,
    after both adapted on the support set (a MAML student at its adapted θ'): by default each
    model's ``"features"`` tap point — the last block, i.e. the embedding a ProtoNet or MatchingNet
    scores (before MatchingNet's L2 normalisation) and what a MAML head reads — flattened per
    query. Several teachers: ``Σ_k w_k · relational_loss(student, teacher_k)``.

    A task needs at least 2 queries for the distances and 3 for the angles.

    Args:
        weight: λ ≥ 0 of the whole term.
        distance_weight: λ_D ≥ 0 of the distance potential.
        angle_weight: λ_A ≥ 0 of the angle potential (0 skips its ``O(N³)`` cost).
        student_tap: a module path of the student's model (default: its ``"features"`` point).
        teacher_tap: a module path of every teacher's model, or one per teacher (default: each
            teacher's ``"features"`` point).
        name: the logged name (``train/loss_relational``).

    Example:
        >>> RelationalKD(weight=1.0, distance_weight=1.0, angle_weight=2.0)
        RelationalKD(name='relational', weight=1.0, distance_weight=1.0, angle_weight=2.0, student_tap=None, teacher_tap=None)
    """

    name = "relational"

    def __init__(
        self,
        weight: float = 1.0,
        distance_weight: float = 1.0,
        angle_weight: float = 2.0,
        student_tap: str | None = None,
        teacher_tap: str | list[str] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, name)
        self.distance_weight, self.angle_weight = relation_weights(
            distance_weight, angle_weight, "RelationalKD"
        )
        paths = [teacher_tap] if not isinstance(teacher_tap, list) else teacher_tap
        for arg, values in (("student_tap", [student_tap]), ("teacher_tap", paths)):
            if not values or not all(v is None or (isinstance(v, str) and v) for v in values):
                raise ValueError(
                    f"{arg} must be a module path (e.g. {arg}: features.3), or None for the "
                    f"model's 'features' tap point; teacher_tap may list one per teacher; got "
                    f"{student_tap if arg == 'student_tap' else teacher_tap!r}."
                )
        self.student_tap, self.teacher_tap = student_tap, teacher_tap

    def bind(self, student: Learner, teachers: Sequence[Learner], theta_star) -> None:  # noqa: ANN001
        s_path = self.student_tap or tap_points(student.model, "features", "RelationalKD")[-1]
        check_paths(student.model, [s_path])
        self._check_embedding(student, s_path, "student")
        if isinstance(self.teacher_tap, list) and len(self.teacher_tap) != len(teachers):
            raise ValueError(
                f"RelationalKD got {len(self.teacher_tap)} teacher_tap paths for {len(teachers)} "
                "teachers; give one path per teacher, or one path for all of them."
            )
        self._student_paths, self._teacher_paths = [s_path], []
        for k, teacher in enumerate(teachers):
            given = self.teacher_tap[k] if isinstance(self.teacher_tap, list) else self.teacher_tap
            path = given or tap_points(teacher.model, "features", "RelationalKD")[-1]
            check_paths(teacher.model, [path])
            self._check_embedding(teacher, path, teacher_name(k, len(teachers)))
            self._teacher_paths.append([path])

    @staticmethod
    def _check_embedding(learner: Learner, path: str, who: str) -> None:
        (out,) = probe(learner, [path])
        if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[0] != 2:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"RelationalKD needs one embedding per image at the {who}'s {path!r}, but it gives "
                f"{shape} for 2 images; tap a layer whose output is [B, ...] (e.g. the "
                "'features' tap point)."
            )

    def forward(self, ctx: TaskContext) -> Tensor:
        student = ctx.student_tap(self._student_paths[0])
        values = [
            relational_loss(
                student, ctx.teacher_tap(k, paths[0]), self.distance_weight, self.angle_weight
            )
            for k, paths in enumerate(self._teacher_paths)
        ]
        return ctx.mix(values)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, distance_weight={self.distance_weight}, "
            f"angle_weight={self.angle_weight}, student_tap={self.student_tap!r}, "
            f"teacher_tap={self.teacher_tap!r}"
        )


__all__ = [
    "RelationalKD",
    "angle_potentials",
    "distance_potentials",
    "relational_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
]

"""Prototype matching: a metric student's class geometry against its teachers', width-free."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from lightning_metakd.algorithms import Learner, MatchingNet, ProtoNet
from lightning_metakd.algorithms.protonet import class_means
from lightning_metakd.distill.term import (
    DistillationTerm,
    TaskContext,
    teacher_name,
)
from lightning_metakd.distill.terms.relational import relation_weights, relational_loss

#: The fewest points whose normalised distances say anything: two points have one distance,
#: which the normalisation makes 1.
MIN_POINTS = 3


def prototype_matching_loss(
    student_points: Tensor,
    teacher_points: Tensor,
    distance_weight: float = 1.0,
    angle_weight: float = 0.0,
) -> Tensor:
    """The relations among a task's class points, student against teacher (RKD on prototypes).

    ``λ_D · mean_{i≠j} l_δ(ψ_D(c^t_i, c^t_j), ψ_D(c^s_i, c^s_j)) + λ_A · (the same for angles)``:
    :func:`~lightning_metakd.distill.terms.relational.relational_loss` (Park et al. 2019, eq. 4-7)
    on the class prototypes ``c_k`` (Snell et al. 2017, eq. 1) or support embeddings of one task,
    row ``i`` the same class (or support image) in both. Widths may differ.

    Shapes: ``[P, D_s]`` and ``[P, D_t]`` with ``P ≥ 3``. Returns a scalar.

    Example:
        >>> import torch
        >>> teacher = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
        >>> float(prototype_matching_loss(teacher[:, :2] * 2, teacher))  # same triangle, 2-d
        0.0
        >>> round(float(prototype_matching_loss(torch.eye(3), teacher)), 4)  # equilateral
        0.0208
    """
    for what, points in (("student_points", student_points), ("teacher_points", teacher_points)):
        if not isinstance(points, Tensor) or points.dim() != 2:
            got = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
            raise ValueError(f"{what} must be class points [P, D], got {got}.")
        if points.shape[0] < MIN_POINTS:
            raise ValueError(
                f"{what} holds {points.shape[0]} points, but prototype matching needs at least "
                f"{MIN_POINTS} (two prototypes have one distance, which the normalisation makes "
                "1: nothing to match); train on tasks with ways >= 3."
            )
    return relational_loss(student_points, teacher_points, distance_weight, angle_weight)


def _metric(learner: Learner, who: str) -> None:
    if not isinstance(learner.algorithm, ProtoNet | MatchingNet):
        raise ValueError(
            f"PrototypeMatching needs a ProtoNet or MatchingNet student and teachers (it compares "
            f"their prototypes or support embeddings), but the {who} is a "
            f"{type(learner.algorithm).__name__}; use RelationalKD (query embeddings, any "
            "algorithm) or SoftLabels for it."
        )


class PrototypeMatching(DistillationTerm):
    """The student's class prototypes (or support embeddings) arranged as the teacher's are.

    A ProtoNet's classifier *is* its prototypes (Snell et al. 2017, eq. 1-2: a query goes to the
    nearest ``c_k``), a MatchingNet's its normalised support embeddings (Vinyals et al. 2016,
    eq. 1-2). A narrower student cannot copy the teacher's points (other width), but it can
    copy their **configuration**: this term matches the prototype-to-prototype distance matrix
    normalised by its mean (RKD-D on the class points, Park et al. 2019, eq. 4-5, Huber loss;
    :func:`prototype_matching_loss`), optionally also the angles (RKD-A, eq. 6-7).

    Why this quantity: (1) it is width-free and invariant to exactly the transformations a
    student's embedding is free to differ by without changing its decisions up to confidence —
    rotations, reflections and translations (the squared-Euclidean classifier is unchanged) and a
    global scale (which only sharpens or softens the softmax, a calibration the student's own task
    loss sets); (2) it loses nothing else: a Euclidean distance matrix determines its points up to
    such an isometry (classical multidimensional scaling, Young & Householder 1938), so a
    normalised one determines them up to similarity; angles are functions of it (law of cosines),
    hence ``angle_weight = 0`` by default. The alternative, the structure of the query-to-prototype
    logits, is what :class:`~lightning_metakd.distill.SoftLabels` already distils on the query set;
    this term acts on the support side, which soft labels reach only through the queries.

    Points per pair: ProtoNet — its prototypes ``[N, D]`` (unit-normalised when
    ``distance="cosine"``, the only part its cosine logits read); MatchingNet — its unit support
    embeddings ``[N·K, D]`` when student and teacher are both MatchingNets (their classifier is
    the whole support set), else their class means ``[N, D]`` so that both sides have one point
    per class. A task needs at least 3 classes (or support images). Several teachers:
    ``Σ_k w_k · loss_k``.

    Args:
        weight: λ ≥ 0.
        distance_weight: λ_D ≥ 0 of the distance potential.
        angle_weight: λ_A ≥ 0 of the angle potential.
        name: the logged name (``train/loss_prototype_matching``).

    Example:
        >>> PrototypeMatching(weight=1.0)
        PrototypeMatching(name='prototype_matching', weight=1.0, distance_weight=1.0, angle_weight=0.0)
    """

    name = "prototype_matching"

    def __init__(
        self,
        weight: float = 1.0,
        distance_weight: float = 1.0,
        angle_weight: float = 0.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, name)
        self.distance_weight, self.angle_weight = relation_weights(
            distance_weight, angle_weight, "PrototypeMatching"
        )
        self._support_level: list[bool] = []

    def bind(self, student: Learner, teachers: Sequence[Learner], theta_star) -> None:  # noqa: ANN001
        _metric(student, "student")
        for k, teacher in enumerate(teachers):
            _metric(teacher, teacher_name(k, len(teachers)))
        if student.ways < MIN_POINTS:
            raise ValueError(
                f"PrototypeMatching needs tasks of at least {MIN_POINTS} classes (two prototypes "
                f"have one distance, which the normalisation makes 1), but ways={student.ways}; "
                "set the module's and the data's ways to 3 or more."
            )
        both = isinstance(student.algorithm, MatchingNet)
        self._support_level = [both and isinstance(t.algorithm, MatchingNet) for t in teachers]

    @staticmethod
    def _points(learner: Learner, state: Any, ways: int, support_level: bool) -> Tensor:
        if isinstance(learner.algorithm, MatchingNet):
            support, onehot = state
            if support_level:
                return support
            return class_means(support, onehot.long().argmax(-1), ways)
        if learner.algorithm.distance == "cosine":
            return F.normalize(state, dim=-1)
        return state

    def forward(self, ctx: TaskContext) -> Tensor:
        values = []
        pairs = zip(ctx.teachers, ctx.teacher_states, self._support_level, strict=True)
        for teacher, state, support_level in pairs:
            s = self._points(ctx.student, ctx.student_state, ctx.ways, support_level)
            t = self._points(teacher, state, ctx.ways, support_level)
            values.append(prototype_matching_loss(s, t, self.distance_weight, self.angle_weight))
        return ctx.mix(values)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, distance_weight={self.distance_weight}, "
            f"angle_weight={self.angle_weight}"
        )


__all__ = ["PrototypeMatching", "prototype_matching_loss"]

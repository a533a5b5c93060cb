"""Adapted-head matching: a MAML-family student's head after adaptation against the teacher's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_metakd.algorithms import Learner
from lightning_metakd.distill.term import DistillationTerm, TaskContext, teacher_name
from lightning_metakd.models.classifier import Classifier

WEIGHT, BIAS = "head.weight", "head.bias"


def adapted_head_loss(
    student_weight: Tensor,
    student_bias: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor,
    columns: Tensor | None = None,
) -> Tensor:
    """``‖W'_s − W'_t[:, columns]‖² + ‖b'_s − b'_t‖²``: the adapted heads, entry by entry.

    ``W'``, ``b'`` are a ``Classifier`` head's weight ``[ways, D]`` and bias ``[ways]`` after the
    inner loop on one task's support set (θ', Finn et al. 2017, eq. 1). ``columns`` are the
    ``D_s`` teacher features that the student's features stand for (the channels θ* slicing kept,
    :func:`~lightning_metakd.distill.slice_state`); ``None`` when both heads have the same width.
    The squared distance is summed, like the θ*-anchor's ``‖θ − θ*‖²``.

    Example:
        >>> import torch
        >>> w_t, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1)
        >>> float(adapted_head_loss(torch.tensor([[1.0, 5.0]]), b, w_t, b, torch.tensor([0, 2])))
        4.0
    """
    if columns is not None:
        teacher_weight = teacher_weight.index_select(-1, columns)
    if student_weight.shape != teacher_weight.shape or student_bias.shape != teacher_bias.shape:
        raise ValueError(
            f"adapted heads differ in shape: student weight {tuple(student_weight.shape)}, bias "
            f"{tuple(student_bias.shape)}; teacher {tuple(teacher_weight.shape)}, "
            f"{tuple(teacher_bias.shape)} (after columns); give the columns θ* kept, or use a "
            "teacher of the student's width and ways."
        )
    weights = (student_weight - teacher_weight).pow(2).sum()
    return weights + (student_bias - teacher_bias).pow(2).sum()


def kept_columns(theta_star_weight: Tensor, teacher_weight: Tensor) -> list[int] | None:
    """Which teacher head columns θ*'s head holds, in order, or ``None`` if some is not one of them.

    :func:`~lightning_metakd.distill.slice_state` copies the kept columns exactly
    (``index_select``), so each θ* column equals one teacher column bit for bit.

    Example:
        >>> import torch
        >>> teacher = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        >>> kept_columns(teacher[:, [0, 2]], teacher), kept_columns(torch.zeros(2, 2), teacher)
        ([0, 2], None)
    """
    if theta_star_weight.shape[0] != teacher_weight.shape[0]:
        return None
    equal = (teacher_weight.unsqueeze(2) == theta_star_weight.unsqueeze(1)).all(0)  # [D_t, D_s]
    if not bool(equal.any(0).all()):
        return None
    return equal.to(torch.uint8).argmax(0).tolist()


class AdaptedHead(DistillationTerm):
    """The student's head after its inner loop, pulled to the teacher's after its inner loop.

    For MAML-family students and teachers (MAML, ANIL, Meta-SGD: a ``Classifier`` whose head the
    inner loop adapts) the task-specific part of the adapted network is the head θ'_head. This
    term distils it directly: ``Σ_k w_k ‖W'_s − W'_{t,k}[:, S_k]‖² + ‖b'_s − b'_{t,k}‖²``
    (:func:`adapted_head_loss`), where ``S_k`` are the teacher features the student's features
    stand for — all of them when the widths are equal; for a narrower student the channels that
    θ* slicing kept (``init_from_teacher: true`` with this teacher as ``anchor_teacher``: the
    student's head starts as those columns of the teacher's, and its features at those channels).
    Together with :class:`~lightning_metakd.distill.ParameterAnchor` (θ near θ*) it asks the
    student's *update* to follow the teacher's too. It reads the adapted states of
    :class:`~lightning_metakd.distill.TaskContext`; nothing is recomputed.

    Args:
        weight: λ ≥ 0 (the heads of ``ways × D`` entries are summed: 0.01–0.1 is a typical start).
        name: the logged name (``train/loss_adapted_head``).

    Example:
        >>> AdaptedHead(weight=0.1)
        AdaptedHead(name='adapted_head', weight=0.1)
    """

    name = "adapted_head"

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        self._columns: list[list[int] | None] = []

    def bind(
        self, student: Learner, teachers: Sequence[Learner], theta_star: Mapping[str, Tensor] | None
    ) -> None:
        for who, learner in [("student", student)] + [
            (teacher_name(k, len(teachers)), t) for k, t in enumerate(teachers)
        ]:
            if not learner.algorithm.needs_head or not isinstance(learner.model, Classifier):
                raise ValueError(
                    f"AdaptedHead compares adapted classifier heads, so it needs a MAML-family "
                    f"student and teachers (MAML, ANIL, MetaSGD), but the {who} is a "
                    f"{type(learner.algorithm).__name__} without a head; use SoftLabels or "
                    "StepwiseSoftLabels(target='final') for it."
                )
        s_weight = student.model.head.weight
        self._columns = []
        for k, teacher in enumerate(teachers):
            t_weight = teacher.model.head.weight
            if t_weight.shape == s_weight.shape:
                self._columns.append(None)
                continue
            held = None if theta_star is None else theta_star.get(WEIGHT)
            columns = None
            if held is not None and held.shape == s_weight.shape:
                columns = kept_columns(held.to(t_weight), t_weight.detach())
            if columns is None:
                raise ValueError(
                    f"AdaptedHead compares the heads on the features the student shares with the "
                    f"{teacher_name(k, len(teachers))}, but its head is {tuple(t_weight.shape)} and "
                    f"the student's {tuple(s_weight.shape)}, and θ* holds no columns of it; set "
                    "init_from_teacher: true with this MAML-family teacher as anchor_teacher (θ* "
                    "slicing then says which features correspond), or use a teacher of the "
                    "student's width."
                )
            self._columns.append(columns)

    def forward(self, ctx: TaskContext) -> Tensor:
        student = ctx.student_state
        values = []
        for teacher, columns in zip(ctx.teacher_states, self._columns, strict=True):
            index = None
            if columns is not None:
                index = torch.tensor(columns, device=teacher[WEIGHT].device)
            values.append(
                adapted_head_loss(
                    student[WEIGHT], student[BIAS], teacher[WEIGHT], teacher[BIAS], index
                )
            )
        return ctx.mix(values)


__all__ = ["AdaptedHead", "adapted_head_loss", "kept_columns"]

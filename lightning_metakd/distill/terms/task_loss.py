"""The task loss: the student's own query cross-entropy after adaptation."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_metakd.algorithms.learner import scored
from lightning_metakd.distill.term import DistillationTerm, TaskContext


class TaskLoss(DistillationTerm):
    """``L_task``: cross-entropy of the student's query logits after it adapted on the support set.

    For a MAML-family student this is the first term of MAML-anchored distillation,
    ``L_task(θ − α∇θ L'_task(θ))``: the query loss of the parameters after the inner step on the
    support loss ``L'_task`` (Finn et al. 2017, eq. 1), differentiated through the inner loop. For
    a metric student (ProtoNet, MatchingNet) it is the episode's classification loss. It needs no
    teacher.

    Args:
        weight: λ ≥ 0 (1 in every shipped config).
        name: the logged name (``train/loss_task``).

    Example:
        >>> TaskLoss(weight=1.0)
        TaskLoss(name='task', weight=1.0)
    """

    name = "task"
    needs_teachers = False

    def forward(self, ctx: TaskContext) -> Tensor:
        return F.cross_entropy(scored(ctx.student_logits), ctx.query_y)


__all__ = ["TaskLoss"]

"""Soft labels: the teacher's tempered class probabilities as the student's targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_metakd.algorithms import Learner
from lightning_metakd.algorithms.learner import scored
from lightning_metakd.distill.ensemble import ensemble_probabilities, teacher_temperatures
from lightning_metakd.distill.term import DistillationTerm, TaskContext, check_positive


def soft_label_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    temperature: float = 4.0,
    *,
    teacher_probs: Tensor | None = None,
) -> Tensor:
    """Knowledge distillation with soft targets: ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``.

    Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", §2: the student
    matches the teacher's class probabilities softened by the temperature ``T``; the factor ``T²``
    keeps the gradient magnitude independent of ``T``. The KL divergence is summed over classes and
    averaged over samples (every leading position is one sample).

    Either ``teacher_logits`` or ``teacher_probs`` is given, not both. ``teacher_probs`` are the
    teacher's *already tempered* probabilities ``softmax(z_t/T)`` (rows summing to 1), e.g. the mean
    of several teachers' tempered probabilities for an ensemble; ``T`` then still divides the
    student logits and scales the loss by ``T²``. They are not checked for normalisation (that
    would need a data-dependent branch, which ``vmap`` forbids).

    Shapes: ``student_logits`` ``[..., C]``; ``teacher_logits``/``teacher_probs`` the same shape.
    Returns a scalar.

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(soft_label_loss(z, z, temperature=2.0))
        0.0
    """
    check_positive(temperature, "temperature", "temperature=4")
    if (teacher_logits is None) == (teacher_probs is None):
        raise ValueError(
            "soft_label_loss needs exactly one teacher target: teacher_logits=... (one teacher) or "
            "teacher_probs=... (tempered probabilities, e.g. an ensemble's mean); got "
            f"{'both' if teacher_logits is not None else 'neither'}."
        )
    teacher = teacher_logits if teacher_logits is not None else teacher_probs
    name = "teacher_logits" if teacher_logits is not None else "teacher_probs"
    if student_logits.dim() < 1 or student_logits.shape != teacher.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and {name} {tuple(teacher.shape)} must "
            "have the same shape [..., classes]; both models must predict the same classes."
        )
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    if teacher_logits is not None:
        log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    else:
        kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(-1)
    return temperature**2 * kl.mean()


class SoftLabels(DistillationTerm):
    """``T² · KL(p_teacher^T ‖ p_student^T)`` on the query set of every task (Hinton et al. 2015).

    Teacher and student adapt on the same support set; the student's query probabilities at
    temperature ``T`` are pulled towards the teacher's (:func:`soft_label_loss`). Several teachers:
    the target is their weighted mean of tempered probabilities, ``Σ_k w_k softmax(z_k / T_k)``
    (:func:`~lightning_metakd.distill.ensemble.ensemble_probabilities`, ``teacher_weights`` of the
    module), with ``T_k = temperature`` unless ``teacher_temperatures`` gives one per teacher —
    for teachers whose logits differ in scale (a ProtoNet's negative squared distances are often
    ten times a MAML head's logits).

    Args:
        weight: λ ≥ 0.
        temperature: ``T > 0`` of the student's softmax (and of every teacher's by default).
        teacher_temperatures: one ``T_k > 0`` per teacher, or ``None``.
        name: the logged name (``train/loss_soft_labels``).

    Example:
        >>> SoftLabels(weight=1.0, temperature=4.0)
        SoftLabels(name='soft_labels', weight=1.0, temperature=4.0, teacher_temperatures=None)
    """

    name = "soft_labels"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 4.0,
        teacher_temperatures: list[float] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, name)
        self.temperature = check_positive(temperature, "temperature", "temperature=4")
        self.teacher_temperatures = (
            None if teacher_temperatures is None else [float(t) for t in teacher_temperatures]
        )

    def bind(self, student: Learner, teachers: Sequence[Learner], theta_star) -> None:  # noqa: ANN001
        if self.teacher_temperatures is not None:
            teacher_temperatures(self.teacher_temperatures, len(teachers))  # checks the length

    def forward(self, ctx: TaskContext) -> Tensor:
        student = scored(ctx.student_logits)
        if len(ctx.teacher_logits) == 1 and self.teacher_temperatures is None:
            return soft_label_loss(student, scored(ctx.teacher_logits[0]), self.temperature)
        temperatures = self.teacher_temperatures or self.temperature
        probs = ensemble_probabilities(
            [scored(z) for z in ctx.teacher_logits], ctx.teacher_weights, temperatures
        )
        return soft_label_loss(student, None, self.temperature, teacher_probs=probs)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, temperature={self.temperature}, "
            f"teacher_temperatures={self.teacher_temperatures}"
        )


__all__ = ["SoftLabels", "soft_label_loss"]

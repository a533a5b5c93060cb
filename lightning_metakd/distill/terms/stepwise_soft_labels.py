"""Stepwise soft labels: distil the adaptation, not only its end, into a MAML-family student."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_metakd.algorithms import MAML, Learner, Params
from lightning_metakd.algorithms.learner import scored
from lightning_metakd.algorithms.normalization import Normalization
from lightning_metakd.distill.ensemble import ensemble_probabilities
from lightning_metakd.distill.term import (
    DistillationTerm,
    TaskContext,
    check_positive,
    teacher_name,
)
from lightning_metakd.distill.terms.soft_labels import soft_label_loss

TARGETS = ("steps", "final")


def one_step(algorithm: MAML) -> MAML:
    """A shallow copy of ``algorithm`` that takes exactly one inner step, in training and evaluation.

    It shares everything else — the learning rate(s) (Meta-SGD's are the same parameters, so they
    still receive their meta-gradient), the adapted names (ANIL), ``first_order`` and
    ``checkpoint_steps`` — so ``k`` chained calls of its ``adapt_task`` are ``k`` steps of the
    algorithm's own inner loop.
    """
    stepper = copy.copy(algorithm)
    stepper.inner_steps = stepper.inner_steps_test = 1
    return stepper


def step_logits(
    algorithm: MAML,
    model: nn.Module,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    ways: int,
    steps: int,
    training: bool,
    normalization: Normalization,
) -> list[Tensor]:
    """Query logits after each of the first ``steps`` inner steps: ``[f_θ1(q), ..., f_θsteps(q)]``.

    ``θ_{k+1} = θ_k − α ∇ L_support(θ_k)`` (Finn et al. 2017, eq. 1), one
    :meth:`~lightning_metakd.algorithms.MetaAlgorithm.adapt_task` of :func:`one_step` at a time, so
    every step follows the learner's normalisation policy (``"support"``: the queries of step ``k``
    are normalised with the support statistics at ``θ_k``) and stays differentiable (second order
    in training, as the inner loop) and pure under ``torch.func.vmap``. Each ``[N*Q, ways]``.
    """
    stepper, current, logits = one_step(algorithm), params, []
    for _ in range(steps):
        task = stepper.adapt_task(
            model, current, support_x, support_y, ways, training, normalization
        )
        logits.append(stepper.predict_task(model, current, task, query_x, ways))
        current = task.state
    return logits


def stepwise_soft_label_loss(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Sequence[Tensor]],
    teacher_weights: Sequence[float],
    temperature: float = 4.0,
) -> Tensor:
    """``1/K Σ_{k=1..K} T² KL(p_teacher,k^T ‖ p_student,k^T)``: soft labels at every inner step.

    ``student_logits[k]`` are the student's query logits after step ``k + 1``; ``teacher_logits[j]
    [k]`` teacher ``j``'s targets for that step (its logits after as many steps, or its final
    logits repeated). With several teachers the target of a step is their
    ``teacher_weights``-weighted mean of tempered probabilities, as for
    :class:`~lightning_metakd.distill.SoftLabels`. Each term is :func:`soft_label_loss` (Hinton et
    al. 2015).

    Shapes: ``K`` tensors ``[N*Q, N]`` for the student; per teacher ``K`` of the same shape.
    Returns a scalar.

    Example:
        >>> import torch
        >>> z = [torch.tensor([[2.0, 0.0]]), torch.tensor([[3.0, -1.0]])]
        >>> float(stepwise_soft_label_loss(z, [z], [1.0], temperature=2.0))
        0.0
    """
    steps = len(student_logits)
    if steps == 0 or any(len(t) != steps for t in teacher_logits) or not teacher_logits:
        raise ValueError(
            f"stepwise_soft_label_loss needs the same number (≥ 1) of student and teacher steps, "
            f"got {steps} student steps and {[len(t) for t in teacher_logits]} per teacher."
        )
    total = scored(student_logits[0]).new_zeros(())
    for k in range(steps):
        student = scored(student_logits[k])
        targets = [scored(t[k]) for t in teacher_logits]
        if len(targets) == 1:
            total = total + soft_label_loss(student, targets[0], temperature)
        else:
            probs = ensemble_probabilities(targets, teacher_weights, temperature)
            total = total + soft_label_loss(student, None, temperature, teacher_probs=probs)
    return total / steps


class StepwiseSoftLabels(DistillationTerm):
    """Soft labels after *every* inner step of a MAML-family student, not only the last.

    Soft labels (Hinton et al. 2015) on the adapted student distil where adaptation ends; a
    student that must also adapt *fast* can be taught the path. For a student taking ``K`` inner
    steps (MAML, Finn et al. 2017, eq. 1; ANIL; Meta-SGD) with query logits ``z_s^k`` after step
    ``k``, this term is ``1/K Σ_{k=1..K} T² KL(p_target^k ‖ p_student^k)``
    (:func:`stepwise_soft_label_loss`), with the target

    - ``target="steps"``: each MAML-family teacher's query logits after ``k`` of *its own* inner
      steps (its learning rate, adapted names and normalisation; from its θ*, without gradients) —
      the student follows the teacher's adaptation step by step;
    - ``target="final"``: each teacher's final logits (adapted with ``inner_steps_test``, any
      algorithm, ProtoNet included) at every step — the student gets there as early as it can.

    Step 0 (before adaptation) is left out: labels are assigned per task, so no initialisation
    can predict them, and the teacher's are as arbitrary. With ``K = 1`` and ``target="final"``
    the term equals :class:`~lightning_metakd.distill.SoftLabels`.

    How and at what cost: :class:`~lightning_metakd.distill.TaskContext` holds only the end of
    the student's inner loop (θ' and its logits), so the term recomputes the intermediate states
    θ_1 … θ_{K−1} from the meta-parameters with the algorithm's own step
    (:func:`step_logits`): per task ``K − 1`` extra support forward-backward passes (second order,
    kept for the meta-gradient like the inner loop's; with ``checkpoint_steps`` recomputed in the
    backward as well) and ``K − 1`` query forward passes — about doubling the student's inner-loop
    cost for large ``K``, nothing for ``K = 1``. ``target="steps"`` adds ``K`` teacher inner steps
    and query passes without a graph (``K − 1`` when the teacher's ``inner_steps_test`` is ``K``:
    its final logits are reused).

    Args:
        weight: λ ≥ 0.
        temperature: ``T > 0`` of every softmax.
        target: ``"steps"`` (the teacher's logits after as many steps) or ``"final"``.
        name: the logged name (``train/loss_stepwise_soft_labels``).

    Example:
        >>> StepwiseSoftLabels(weight=1.0, temperature=4.0, target="steps")
        StepwiseSoftLabels(name='stepwise_soft_labels', weight=1.0, temperature=4.0, target='steps')
    """

    name = "stepwise_soft_labels"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 4.0,
        target: str = "steps",
        name: str | None = None,
    ) -> None:
        super().__init__(weight, name)
        self.temperature = check_positive(temperature, "temperature", "temperature=4")
        if target not in TARGETS:
            raise ValueError(
                f"target must be 'steps' (the teacher's logits after as many inner steps) or "
                f"'final' (its final logits at every step), got {target!r}."
            )
        self.target = target

    def bind(self, student: Learner, teachers: Sequence[Learner], theta_star) -> None:  # noqa: ANN001
        algorithm = student.algorithm
        if not isinstance(algorithm, MAML):
            raise ValueError(
                f"StepwiseSoftLabels needs a MAML-family student (MAML, ANIL, MetaSGD: it distils "
                f"each inner step), but the student is a {type(algorithm).__name__}, which has no "
                "inner steps; use SoftLabels (or PrototypeMatching for a metric student)."
            )
        if algorithm.inner_steps < 1:
            raise ValueError(
                f"StepwiseSoftLabels distils the student's inner steps, but its "
                f"{type(algorithm).__name__} takes inner_steps={algorithm.inner_steps} in training; "
                "set inner_steps >= 1."
            )
        if self.target == "steps":
            for k, teacher in enumerate(teachers):
                if not isinstance(teacher.algorithm, MAML):
                    raise ValueError(
                        f"StepwiseSoftLabels(target='steps') needs MAML-family teachers (their "
                        f"logits after each inner step), but the {teacher_name(k, len(teachers))} "
                        f"is a {type(teacher.algorithm).__name__}; use target='final' (its final "
                        "logits at every step)."
                    )

    def _teacher_steps(self, ctx: TaskContext, steps: int) -> list[list[Tensor]]:
        if self.target == "final":
            return [[logits] * steps for logits in ctx.teacher_logits]
        targets = []
        with torch.no_grad():
            for teacher, final in zip(ctx.teachers, ctx.teacher_logits, strict=True):
                reuse = teacher.algorithm.inner_steps_test == steps
                logits = step_logits(
                    teacher.algorithm, teacher.model, teacher.params(detach=True), ctx.support_x,
                    ctx.support_y, ctx.query_x, ctx.ways, steps - reuse, False, teacher.policy(),
                )  # fmt: skip
                targets.append([*logits, final] if reuse else logits)
        return targets

    def forward(self, ctx: TaskContext) -> Tensor:
        student = ctx.student
        steps = student.algorithm.steps(ctx.training)
        if steps < 1:
            raise ValueError(
                f"StepwiseSoftLabels has no inner step to distil: the student takes {steps} steps "
                f"{'in training' if ctx.training else 'in evaluation (inner_steps_test)'}; set "
                "them to 1 or more."
            )
        earlier = step_logits(
            student.algorithm, student.model, ctx.student_params, ctx.support_x, ctx.support_y,
            ctx.query_x, ctx.ways, steps - 1, ctx.training, student.policy(training=ctx.training),
        )  # fmt: skip
        return stepwise_soft_label_loss(
            [*earlier, ctx.student_logits],
            self._teacher_steps(ctx, steps),
            ctx.teacher_weights,
            self.temperature,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, target={self.target!r}"


__all__ = ["StepwiseSoftLabels", "one_step", "step_logits", "stepwise_soft_label_loss"]

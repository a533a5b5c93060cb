"""MAML-anchored distillation: ``L = L_task(θ − α∇θ L'_task(θ)) + λ‖θ − θ*‖²``.

The first term is :class:`~lightning_metakd.distill.terms.task_loss.TaskLoss` (the student's
query loss after its inner loop); the second, here, keeps the student's meta-parameters θ near
the teacher's meta-learned θ* (sliced to the student's widths when it is narrower).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_metakd.algorithms import Learner
from lightning_metakd.distill.term import DistillationTerm, StepContext, check_weight


def parameter_anchor_loss(params: Mapping[str, Tensor], theta_star: Mapping[str, Tensor]) -> Tensor:
    """``‖θ − θ*‖²``: the squared distance of the parameters to the anchor θ*, summed over names.

    Every name of ``theta_star`` is anchored; ``params`` may hold more names (e.g. a projector),
    which are left free. θ* is usually the meta-trained teacher's state sliced to the student's
    widths by :func:`lightning_metakd.distill.transfer.slice_state`.

    Shapes: ``{name: tensor}`` with ``params[name].shape == theta_star[name].shape``. Returns a
    scalar.

    Example:
        >>> import torch
        >>> float(parameter_anchor_loss({"w": torch.tensor([1.0, 2.0])}, {"w": torch.zeros(2)}))
        5.0
    """
    if not theta_star:
        raise ValueError("theta_star is empty; pass the anchor parameters {name: tensor}.")
    missing = [n for n in theta_star if n not in params]
    if missing:
        raise ValueError(
            f"theta_star anchors parameters that params lacks: {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''} (params has e.g. {list(params)[:3]}); build "
            "theta_star for this student with transfer.slice_state(teacher, student), or use a "
            "student of the same architecture as the anchor."
        )
    mismatched = [
        f"{n}: {tuple(params[n].shape)} vs theta_star {tuple(t.shape)}"
        for n, t in theta_star.items()
        if params[n].shape != t.shape
    ]
    if mismatched:
        raise ValueError(
            f"parameter shapes differ from the anchor: {'; '.join(mismatched[:3])}; slice the "
            "teacher to the student's widths with transfer.slice_state(teacher, student), or use "
            "a student of the same architecture and width."
        )
    return sum((params[n] - t).pow(2).sum() for n, t in theta_star.items())


def maml_anchored_distillation_loss(
    adapted_task_loss: Tensor,
    params: Mapping[str, Tensor],
    theta_star: Mapping[str, Tensor],
    weight: float,
) -> Tensor:
    """MAML-anchored distillation: ``L = L_task(θ − α∇θ L'_task(θ)) + λ‖θ − θ*‖²``.

    ``adapted_task_loss`` is the first term, the query loss of the parameters after the inner loop
    (``θ' = θ − α∇θ L'_task(θ)`` on the support set, Finn et al. 2017, Eq. 1; computed by
    :func:`lightning_metakd.algorithms.inner_loop`). The second term keeps the student's
    meta-parameters θ (``params``, *before* adaptation) near the teacher's meta-learned θ*
    (``theta_star``), with weight λ = ``weight`` ≥ 0.

    Example:
        >>> import torch
        >>> theta = {"w": torch.tensor([1.0])}
        >>> float(maml_anchored_distillation_loss(torch.tensor(0.5), theta, {"w": torch.zeros(1)}, 2.0))
        2.5
    """
    return adapted_task_loss + check_weight(weight) * parameter_anchor_loss(params, theta_star)


class ParameterAnchor(DistillationTerm):
    """``‖θ − θ*‖²``: the θ*-anchor of MAML-anchored distillation, once per step.

    θ* is the anchor teacher's meta-learned initialisation for the student's parameter names —
    the state the student starts from with ``init_from_teacher`` (sliced to its widths), or the
    teacher's own state for a student of the teacher's architecture. It is stored as buffers
    (saved in checkpoints, moved with the module, never optimised); non-floating entries and names
    that are not student parameters are left out. With ``TaskLoss`` this is
    ``L = L_task(θ − α∇θ L'_task(θ)) + λ‖θ − θ*‖²`` (:func:`maml_anchored_distillation_loss`).

    Args:
        weight: λ ≥ 0 (0.01 is a typical start: ‖θ − θ*‖² sums over every parameter).
        name: the logged name (``train/loss_anchor``).
    """

    name = "anchor"
    per_task = False
    needs_teachers = False

    def __init__(self, weight: float = 0.01, name: str | None = None) -> None:
        super().__init__(weight, name)
        self.store = nn.Module()
        self.names: list[str] = []

    def bind(
        self, student: Learner, teachers: Sequence[Learner], theta_star: Mapping[str, Tensor] | None
    ) -> None:
        params = dict(student.model.named_parameters())
        if theta_star is None:
            raise ValueError(
                "ParameterAnchor needs θ* for the student's parameters, but the anchor teacher's "
                "state does not fit the student; set init_from_teacher: true (θ* sliced to the "
                "student's widths), use a student of the teacher's architecture, or drop the anchor."
            )
        names = [n for n, t in theta_star.items() if torch.is_floating_point(t) and n in params]
        if not names:
            raise ValueError(
                "θ* shares no floating-point parameter names with the student; build the student "
                "of the teacher's family (init_from_teacher slices it) or drop the anchor."
            )
        self.store = nn.Module()
        for n in names:
            self.store.register_buffer(n.replace(".", "__"), theta_star[n].detach().clone())
        self.names = names
        with torch.no_grad():  # shape mismatches fail now, with their message
            parameter_anchor_loss(params, self.theta_star)

    @property
    def theta_star(self) -> dict[str, Tensor]:
        """θ* as ``{parameter name: tensor}``."""
        return {n: getattr(self.store, n.replace(".", "__")) for n in self.names}

    def forward(self, ctx: StepContext) -> Tensor:
        return parameter_anchor_loss(ctx.student_params, self.theta_star)


__all__ = ["ParameterAnchor", "maml_anchored_distillation_loss", "parameter_anchor_loss"]

"""Activation-based attention transfer between conv blocks (Zagoruyko & Komodakis 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from lightning_metakd.algorithms import Learner
from lightning_metakd.distill.taps import tap_points
from lightning_metakd.distill.term import (
    DistillationTerm,
    TaskContext,
    as_layers,
    check_positive,
    probe,
    teacher_name,
)


def spatial_attention(feature_map: Tensor, p: float = 2.0) -> Tensor:
    """``Q = Σ_c |A_c|^p`` flattened and L2-normalised per sample: ``[B, C, H, W]`` → ``[B, H*W]``.

    The activation-based spatial attention map of Zagoruyko & Komodakis (2017), §3.1.
    """
    if feature_map.dim() != 4:
        raise ValueError(
            f"attention transfer expects feature maps [B, C, H, W], got {tuple(feature_map.shape)}."
        )
    q = feature_map.abs().pow(p).sum(1).flatten(1)
    return F.normalize(q, p=2.0, dim=1)


def attention_transfer_loss(
    student_maps: Tensor | Sequence[Tensor],
    teacher_maps: Tensor | Sequence[Tensor],
    p: float = 2.0,
) -> Tensor:
    """Activation-based attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to
    Attention", §3.1).

    For a feature map ``A`` ``[B, C, H, W]`` the spatial attention is ``Q = Σ_c |A_c|^p``, flattened
    to ``[B, H*W]`` and divided by its L2 norm per sample (:func:`spatial_attention`). The loss is

        ``mean_b ‖Q_s[b]/‖Q_s[b]‖₂ − Q_t[b]/‖Q_t[b]‖₂‖₂²``, summed over the listed layers.

    Exact form and why: the paper writes the (unsquared) p-norm of the difference, weighted by β/2;
    we square the L2 distance, as the authors' reference implementation does, so the gradient is
    smooth at zero, and we *sum* over positions rather than average, so the value (in [0, 4]) does
    not depend on the resolution of the layer. Channel counts may differ (``Q`` sums them out);
    when the spatial sizes differ the student's ``Q`` map is resized bilinearly to the teacher's
    before normalisation.

    Args:
        student_maps, teacher_maps: one ``[B, C, H, W]`` map each, or equally long lists of them
            (layer ``j`` of the student is compared with layer ``j`` of the teacher).
        p: exponent of the activations (2 in the paper).

    Returns a scalar.

    Example:
        >>> import torch
        >>> a = torch.randn(2, 8, 5, 5)
        >>> float(attention_transfer_loss(a, 3 * a)) < 1e-12  # the activations' scale does not matter
        True
    """
    check_positive(p, "p", "p=2 (the paper's exponent)")
    students = as_layers(student_maps, "student_maps")
    teachers = as_layers(teacher_maps, "teacher_maps")
    if len(students) != len(teachers):
        raise ValueError(
            f"attention_transfer_loss got {len(students)} student maps and {len(teachers)} teacher "
            "maps; pass one student map per teacher map, in matching order."
        )
    total = students[0].new_zeros(())
    for j, (s, t) in enumerate(zip(students, teachers, strict=True)):
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
            raise ValueError(
                f"layer {j}: attention transfer needs feature maps [B, C, H, W] with the same batch "
                f"size, got student {tuple(s.shape)} and teacher {tuple(t.shape)}."
            )
        q_s = s.abs().pow(p).sum(1, keepdim=True)
        if q_s.shape[-2:] != t.shape[-2:]:
            q_s = F.interpolate(q_s, size=tuple(t.shape[-2:]), mode="bilinear", align_corners=False)
        q_s = F.normalize(q_s.flatten(1), p=2.0, dim=1)
        total = total + (q_s - spatial_attention(t, p)).pow(2).sum(1).mean()
    return total


def _conv_blocks(learner: Learner, who: str) -> list[str]:
    """The ``"blocks"`` tap points of ``learner``, checked to give conv feature maps."""
    paths = tap_points(learner.model, "blocks", "AttentionTransfer")
    shapes = [tuple(out.shape) for out in probe(learner, paths)]
    if any(len(shape) != 4 for shape in shapes):
        raise ValueError(
            f"AttentionTransfer compares conv feature maps [B, C, H, W], but the {who}'s blocks "
            f"({type(learner.backbone).__name__}) give {shapes[0]}; use AttentionDistillation "
            "for VisionTransformers, or FeatureHints."
        )
    return paths


class AttentionTransfer(DistillationTerm):
    """``Σ_j ‖Q_s^j − Q_t^j‖²`` over the conv blocks: where the student's activations concentrate.

    Zagoruyko & Komodakis (2017), §3.1 (:func:`attention_transfer_loss`): block ``j`` of the student
    (its ``"blocks"`` tap points) is compared with block ``j`` of each teacher on the query forward
    pass after adaptation; channel counts may differ. Both backbones need the same number of
    blocks. The paper's β/2 is the ``weight`` (they use β = 10³ with a mean over positions; this
    sum-over-positions form needs about ``10³ / (2·H·W)``).

    Args:
        weight: λ ≥ 0.
        p: exponent of the activations (2 in the paper).
        name: the logged name (``train/loss_attention_transfer``).
    """

    name = "attention_transfer"

    def __init__(self, weight: float = 1.0, p: float = 2.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        self.p = check_positive(p, "p", "p=2 (the paper's exponent)")

    def bind(self, student: Learner, teachers: Sequence[Learner], theta_star) -> None:  # noqa: ANN001
        self._student_paths = _conv_blocks(student, "student")
        self._teacher_paths = []
        for k, teacher in enumerate(teachers):
            paths = _conv_blocks(teacher, teacher_name(k, len(teachers)))
            if len(paths) != len(self._student_paths):
                raise ValueError(
                    f"AttentionTransfer pairs conv blocks one to one, but the student has "
                    f"{len(self._student_paths)} and the {teacher_name(k, len(teachers))} "
                    f"{len(paths)}; use backbones of equal depth (or FeatureHints with chosen taps)."
                )
            self._teacher_paths.append(paths)

    def forward(self, ctx: TaskContext) -> Tensor:
        students = [ctx.student_tap(p) for p in self._student_paths]
        values = [
            attention_transfer_loss(students, [ctx.teacher_tap(k, p) for p in paths], self.p)
            for k, paths in enumerate(self._teacher_paths)
        ]
        return ctx.mix(values)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


__all__ = ["AttentionTransfer", "attention_transfer_loss", "spatial_attention"]

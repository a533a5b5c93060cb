"""Attention distillation: ``L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²`` between ViTs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_metakd.algorithms import Learner
from lightning_metakd.distill.taps import default_layer_map, tap_points
from lightning_metakd.distill.term import (
    DistillationTerm,
    TaskContext,
    as_layers,
    probe,
    teacher_name,
)

KINDS = ("frobenius", "kl")


def _check_layer_map(layer_map: Sequence[int], student_layers: int, teacher_layers: int) -> None:
    if isinstance(layer_map, (str, bytes)) or not isinstance(layer_map, Sequence):
        raise TypeError(
            f"layer_map must be a list of teacher layer indices, one per student layer, got "
            f"{layer_map!r}."
        )
    if len(layer_map) != student_layers:
        raise ValueError(
            f"layer_map has {len(layer_map)} entries but the student has {student_layers} attention "
            "layers; give one teacher layer index per student layer (to distil only some student "
            "layers, pass only those maps)."
        )
    bad = [
        j
        for j in layer_map
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < teacher_layers
    ]
    if bad:
        raise ValueError(
            f"layer_map entries must be integers in [0, {teacher_layers}) (the teacher has "
            f"{teacher_layers} attention layers), got {list(layer_map)}; invalid: {bad}."
        )


def attention_map_loss(
    student_attentions: Tensor | Sequence[Tensor],
    teacher_attentions: Tensor | Sequence[Tensor],
    layer_map: Sequence[int] | None = None,
    kind: Literal["frobenius", "kl"] = "frobenius",
) -> Tensor:
    """Attention distillation: ``Σ_l ‖A_target^l − A_meta^l‖_F²``.

    The distillation term of ``L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²``: the student
    (target) network's self-attention probabilities ``A_target^l`` are pulled towards the
    meta-learned teacher's ``A_meta^l``, layer by layer. Matching attention matrices follows
    TinyBERT (Jiao et al. 2020, §3.1, attention-based distillation, an MSE between attention
    matrices); ``kind="kl"`` follows MiniLM (Wang et al. 2020, §3.1, self-attention distribution
    transfer).

    - **Normalisation.** ``kind="frobenius"``: for each layer, the squared Frobenius norm of the
      difference over ``(heads, T, T)`` is averaged over the batch (every leading position is one
      sample), then summed over layers. A batch of identical samples gives the single-sample value.
    - **Heads.** Equal head counts: heads are compared one to one and their squared norms summed.
      Different head counts: the heads of *both* maps are averaged to one ``[B, T, T]`` map first.
    - **Layers.** Student layer ``i`` is compared with teacher layer ``layer_map[i]``; by default
      :func:`default_layer_map` (``round((i+1)·L_t/L_s) − 1``, identity for equal depths).
    - **KL.** ``kind="kl"``: ``KL(A_meta ‖ A_target)`` of every attention row (a distribution over
      keys), averaged over rows (batch × heads × query tokens), summed over layers.

    Args:
        student_attentions: ``A_target``: a list over the student's layers of ``[B, H_s, T, T]``
            (what ``VisionTransformer.forward(x, return_attention=True)`` returns), or one tensor.
        teacher_attentions: ``A_meta``: a list over the teacher's layers of ``[B, H_t, T, T]``.
        layer_map: optional teacher layer index for each student layer (validated).
        kind: ``"frobenius"`` or ``"kl"``.

    Token counts ``T`` and batch sizes must match: the teacher and the student must cut the image
    into the same patches. Returns a scalar.

    Example:
        >>> import torch
        >>> a = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
        >>> float(attention_map_loss([a, a], [a, a, a, a]))
        0.0
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}.")
    students = as_layers(student_attentions, "student_attentions")
    teachers = as_layers(teacher_attentions, "teacher_attentions")
    if layer_map is None:
        layer_map = default_layer_map(len(students), len(teachers))
    else:
        _check_layer_map(layer_map, len(students), len(teachers))
    total = students[0].new_zeros(())
    for i, (s, j) in enumerate(zip(students, layer_map, strict=True)):
        t = teachers[j]
        if s.dim() < 3 or t.dim() != s.dim() or s.shape[-1] != s.shape[-2]:
            raise ValueError(
                f"attention maps must be [B, heads, T, T] (same rank for student and teacher), got "
                f"student layer {i} {tuple(s.shape)} and teacher layer {j} {tuple(t.shape)}."
            )
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"token counts differ: student layer {i} has T={s.shape[-1]} tokens, teacher layer "
                f"{j} has T={t.shape[-1]}; build both VisionTransformers with the same image_size "
                "and patch_size."
            )
        if s.shape[:-3] != t.shape[:-3]:
            raise ValueError(
                f"batch sizes differ: student layer {i} {tuple(s.shape)} vs teacher layer {j} "
                f"{tuple(t.shape)}; feed both networks the same images."
            )
        if s.shape[-3] != t.shape[-3]:
            s, t = s.mean(-3, keepdim=True), t.mean(-3, keepdim=True)
        if kind == "frobenius":
            total = total + (s - t).pow(2).sum((-3, -2, -1)).mean()
        else:
            log_s = torch.log(s.clamp_min(torch.finfo(s.dtype).tiny))
            total = total + (torch.xlogy(t, t) - t * log_s).sum(-1).mean()
    return total


class AttentionDistillation(DistillationTerm):
    """Attention distillation, the ``λ Σ_l ‖A_target^l − A_meta^l‖_F²`` of
    ``L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²``.

    The student's (target) self-attention probabilities on the query forward pass after adaptation
    are pulled towards each meta-trained teacher's (:func:`attention_map_loss`); both networks need
    ``"attention"`` tap points (:class:`~lightning_metakd.models.VisionTransformer`) and the same
    patches. Student layer ``i`` meets teacher layer ``layer_map[i]`` (default
    :func:`default_layer_map` of each teacher's depth).

    Args:
        weight: λ ≥ 0.
        layer_map: the teacher layer for each student layer, for every teacher.
        kind: ``"frobenius"`` (TinyBERT's matrix distance) or ``"kl"`` (MiniLM's row KL).
        name: the logged name (``train/loss_attention``).
    """

    name = "attention"

    def __init__(
        self,
        weight: float = 1.0,
        layer_map: list[int] | None = None,
        kind: Literal["frobenius", "kl"] = "frobenius",
        name: str | None = None,
    ) -> None:
        super().__init__(weight, name)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}.")
        if layer_map is not None and (
            isinstance(layer_map, str | bytes) or not isinstance(layer_map, Sequence)
        ):
            raise TypeError(
                f"layer_map must be a list of teacher layer indices, got {layer_map!r}."
            )
        self.layer_map = None if layer_map is None else list(layer_map)
        self.kind = kind
        self._layer_maps: list[list[int]] = []

    def bind(self, student: Learner, teachers: Sequence[Learner], theta_star) -> None:  # noqa: ANN001
        need = (
            "AttentionDistillation (attention maps; AttentionTransfer distils conv activation maps)"
        )
        self._student_paths = tap_points(student.model, "attention", need)
        self._teacher_paths, self._layer_maps = [], []
        s_maps = probe(student, self._student_paths)
        for k, teacher in enumerate(teachers):
            paths = tap_points(
                teacher.model, "attention", f"{need} for the {teacher_name(k, len(teachers))}"
            )
            attention_map_loss(
                s_maps, probe(teacher, paths), self.layer_map, self.kind
            )  # validates
            self._teacher_paths.append(paths)
            self._layer_maps.append(
                default_layer_map(len(s_maps), len(paths))
                if self.layer_map is None
                else self.layer_map
            )

    def layer_maps(self) -> list[list[int]]:
        """The teacher layer of each student layer, per teacher (after :meth:`bind`)."""
        return self._layer_maps

    def forward(self, ctx: TaskContext) -> Tensor:
        students = [ctx.student_tap(p) for p in self._student_paths]
        values = [
            attention_map_loss(
                students, [ctx.teacher_tap(k, p) for p in paths], self._layer_maps[k], self.kind
            )
            for k, paths in enumerate(self._teacher_paths)
        ]
        return ctx.mix(values)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer_map={self.layer_map}, kind={self.kind!r}"


__all__ = ["AttentionDistillation", "attention_map_loss"]

"""FitNets hints: the student's intermediate features regressed onto the teacher's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_metakd.algorithms import Learner
from lightning_metakd.distill.taps import check_paths, default_layer_map, tap_points
from lightning_metakd.distill.term import DistillationTerm, TaskContext, probe, teacher_name


def feature_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared error between (projected) student features and teacher features.

    The hint loss of FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", §2.2),
    ``‖u_teacher − r(v_student)‖²``, averaged over every element (instead of the paper's ½-sum) so
    that its scale does not depend on the width or the resolution of the tapped layer. The
    regressor ``r`` is a :class:`HintProjector`; this function compares tensors of
    equal shape.

    Shapes: any ``[B, ...]``, equal for both arguments. Returns a scalar.

    Example:
        >>> import torch
        >>> float(feature_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]])))
        2.0
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} differ in shape; project the student's features with "
            "HintProjector(student_dim, teacher_dim), which learns a 1x1 conv or linear map "
            "and resizes feature maps."
        )
    return (student_features - teacher_features).pow(2).mean()


class HintProjector(nn.Module):
    """The learned regressor ``r`` of FitNets and its loss: ``MSE(r(student), teacher)``.

    Romero et al. (2015), §2.2: a narrow student cannot reproduce a wide teacher's features
    directly, so ``r`` maps the student's ``student_dim`` channels to the teacher's ``teacher_dim``:

    - ``kind="map"``: feature maps ``[B, C, H, W]``; ``r`` is a 1x1 convolution, and a student map
      whose spatial size differs from the teacher's is resized bilinearly to it.
    - ``kind="vector"``: features in the last dimension, ``[B, D]`` embeddings or ``[B, T, D]``
      token sequences; ``r`` is a linear layer.
    - equal widths: ``r`` is the identity and the module has no parameters.

    Example:
        >>> import torch
        >>> hint = HintProjector(student_dim=16, teacher_dim=64)
        >>> hint(torch.randn(2, 16, 5, 5), torch.randn(2, 64, 5, 5)).shape
        torch.Size([])
        >>> sum(p.numel() for p in hint.parameters())  # 1x1 conv: 64 * 16 weights + 64 biases
        1088
    """

    def __init__(
        self, student_dim: int, teacher_dim: int, kind: Literal["map", "vector"] = "map"
    ) -> None:
        super().__init__()
        if (
            not (isinstance(student_dim, int) and isinstance(teacher_dim, int))
            or min(student_dim, teacher_dim) < 1
        ):
            raise ValueError(
                "student_dim and teacher_dim must be positive integers (channel or feature "
                f"counts), got student_dim={student_dim!r}, teacher_dim={teacher_dim!r}."
            )
        if kind not in ("map", "vector"):
            raise ValueError(
                f"kind must be 'map' ([B, C, H, W] feature maps) or 'vector' ([..., D] features), "
                f"got kind={kind!r}."
            )
        self.student_dim, self.teacher_dim, self.kind = student_dim, teacher_dim, kind
        if student_dim == teacher_dim:
            self.projector: nn.Module = nn.Identity()
        elif kind == "map":
            self.projector = nn.Conv2d(student_dim, teacher_dim, kernel_size=1)
        else:
            self.projector = nn.Linear(student_dim, teacher_dim)

    @classmethod
    def between(cls, student_features: Tensor, teacher_features: Tensor) -> HintProjector:
        """A projector sized from example outputs of the two tapped layers."""
        if student_features.dim() == 4 and teacher_features.dim() == 4:
            return cls(student_features.shape[1], teacher_features.shape[1], "map")
        return cls(student_features.shape[-1], teacher_features.shape[-1], "vector")

    def project(self, student_features: Tensor) -> Tensor:
        """``r(student_features)``: the student's features in the teacher's width."""
        if self.kind == "map":
            if student_features.dim() != 4 or student_features.shape[1] != self.student_dim:
                raise ValueError(
                    f"HintProjector(kind='map') expects student maps [B, {self.student_dim}, "
                    f"H, W], got {tuple(student_features.shape)}; use kind='vector' for [..., D] "
                    "features, or check student_dim."
                )
        elif student_features.dim() < 1 or student_features.shape[-1] != self.student_dim:
            raise ValueError(
                f"HintProjector(kind='vector') expects student features [..., "
                f"{self.student_dim}], got {tuple(student_features.shape)}; use kind='map' for "
                "[B, C, H, W] maps, or check student_dim."
            )
        return self.projector(student_features)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        projected = self.project(student_features)
        if self.kind == "map" and teacher_features.dim() == 4:
            size = tuple(teacher_features.shape[-2:])
            if tuple(projected.shape[-2:]) != size:
                projected = F.interpolate(
                    projected, size=size, mode="bilinear", align_corners=False
                )
        return feature_loss(projected, teacher_features)

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, kind={self.kind!r}"


class FeatureHints(DistillationTerm):
    """FitNets hints (Romero et al. 2015): ``Σ_l MSE(r_l(h_student^l), h_teacher^l)``, after adaptation.

    The student's and each teacher's layers are tapped on the query forward pass after both adapted
    on the support set (so a MAML student is hinted at its adapted θ'); a learned
    :class:`HintProjector` per layer and teacher maps the student's width to the teacher's. Its
    parameters train with the student. Several teachers: the ``teacher_weights``-weighted sum of one
    term per teacher, each with its own projectors.

    Args:
        weight: λ ≥ 0.
        student_taps: module paths of the student's model (default: its ``"features"`` tap point,
            the last block); several paths give hints at several depths.
        teacher_taps: the teachers' paths paired one to one with ``student_taps``: a list used for
            every teacher, or a list of such lists, one per teacher. Default: each teacher's
            ``"features"`` point for one student tap; for several, the teacher's ``"blocks"`` at
            the same relative depths (:func:`~lightning_metakd.distill.taps.default_layer_map` of each student tap's block index).
        name: the logged name (``train/loss_feature_hints``).

    Example::

        FeatureHints(weight=1.0)                                    # last block to last block
        FeatureHints(student_taps=["features.1", "features.3"])    # two depths, Conv4 students
    """

    name = "feature_hints"

    def __init__(
        self,
        weight: float = 1.0,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | list[list[str]] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, name)
        for arg, value in (("student_taps", student_taps), ("teacher_taps", teacher_taps)):
            if value is not None and (isinstance(value, str) or not value):
                raise ValueError(
                    f"{arg} must be a non-empty list of module paths, got {value!r}; e.g. "
                    f"{arg}: [features.3]."
                )
        self.student_taps, self.teacher_taps = student_taps, teacher_taps
        self.projectors = nn.ModuleList()  # [teacher][layer], built by bind

    def bind(self, student: Learner, teachers: Sequence[Learner], theta_star) -> None:  # noqa: ANN001
        s_paths = self.student_taps or tap_points(student.model, "features", "FeatureHints")
        check_paths(student.model, s_paths)
        per_teacher = self._teacher_lists(len(teachers))
        self._student_paths, self._teacher_paths = list(s_paths), []
        self.projectors = nn.ModuleList()
        for k, teacher in enumerate(teachers):
            t_paths = per_teacher[k] or self._default_teacher_paths(student, teacher, s_paths)
            if len(t_paths) != len(s_paths):
                raise ValueError(
                    f"FeatureHints pairs student and {teacher_name(k, len(teachers))} layers one to "
                    f"one, but got {len(s_paths)} student taps {s_paths} and {len(t_paths)} "
                    f"teacher taps {t_paths}; give as many teacher_taps as student_taps."
                )
            s_out, t_out = probe(student, s_paths), probe(teacher, t_paths)
            self.projectors.append(
                nn.ModuleList(
                    HintProjector.between(s, t) for s, t in zip(s_out, t_out, strict=True)
                )
            )
            self._teacher_paths.append(list(t_paths))
        self.projectors.to(next(student.parameters()).device)

    def _teacher_lists(self, count: int) -> list[list[str] | None]:
        given = self.teacher_taps
        if given is None:
            return [None] * count
        if all(isinstance(p, str) for p in given):
            return [list(given)] * count  # type: ignore[list-item]
        if len(given) != count or not all(isinstance(p, list) and p for p in given):
            raise ValueError(
                f"teacher_taps must be a list of module paths for every teacher, or one such list "
                f"per teacher ({count} here), got {given!r}."
            )
        return [list(p) for p in given]  # type: ignore[arg-type]

    @staticmethod
    def _default_teacher_paths(student: Learner, teacher: Learner, s_paths: list[str]) -> list[str]:
        if len(s_paths) == 1:
            return tap_points(teacher.model, "features", "FeatureHints")
        s_blocks = tap_points(student.model, "blocks", "FeatureHints with several student_taps")
        t_blocks = tap_points(teacher.model, "blocks", "FeatureHints with several student_taps")
        depth = default_layer_map(len(s_blocks), len(t_blocks))
        unknown = [p for p in s_paths if p not in s_blocks]
        if unknown:
            raise ValueError(
                f"FeatureHints cannot pair the student taps {unknown} with teacher layers by "
                f"depth (they are not among the student's blocks {s_blocks}); give teacher_taps."
            )
        return [t_blocks[depth[s_blocks.index(p)]] for p in s_paths]

    def forward(self, ctx: TaskContext) -> Tensor:
        values = []
        for k, projectors in enumerate(self.projectors):
            pairs = zip(self._student_paths, self._teacher_paths[k], projectors, strict=True)
            layers = [r(ctx.student_tap(s), ctx.teacher_tap(k, t)) for s, t, r in pairs]
            total = layers[0]
            for value in layers[1:]:
                total = total + value
            values.append(total)
        return ctx.mix(values)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, student_taps={self.student_taps}, "
            f"teacher_taps={self.teacher_taps}"
        )


__all__ = ["FeatureHints", "HintProjector", "feature_loss"]

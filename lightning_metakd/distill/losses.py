"""Distillation losses: each a pure function plus a thin ``nn.Module`` holding its weight.

The functions are the mathematics; tests and algorithms call them directly. They use only shape
checks (no data-dependent Python branches), so they run per task inside a Python loop or under
:func:`torch.func.vmap`. Teacher-side arguments are used as given: pass them detached (or computed
under ``torch.no_grad()``) when the teacher is fixed; gradients then reach only the student.

The modules hold hyper-parameters (the weight λ, the temperature, a learned projector, the anchor
θ*) and validate them once, in the constructor, so that a bad configuration fails at start-up.

- :func:`soft_label_loss` / :class:`SoftLabelDistillation`: Hinton et al. (2015); several
  teachers through :func:`ensemble_probabilities` (and :func:`ensemble_weights`).
- :func:`feature_loss` / :class:`FeatureDistillation`: FitNets hints (Romero et al. 2015).
- :func:`attention_transfer_loss` / :class:`AttentionTransfer`: Zagoruyko & Komodakis (2017).
- :func:`attention_map_loss` / :class:`AttentionDistillation`: attention distillation,
  ``L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²``.
- :func:`parameter_anchor_loss` / :class:`ParameterAnchor` and
  :func:`maml_anchored_distillation_loss`: MAML-anchored distillation,
  ``L = L_task(θ − α∇θ L'_task(θ)) + λ‖θ − θ*‖²``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_weight(weight: float) -> float:
    if not isinstance(weight, (int, float)) or math.isnan(weight) or weight < 0:
        raise ValueError(
            f"weight must be a non-negative number (it is the loss weight λ), got weight={weight!r}; "
            "use weight=0 to switch the term off."
        )
    return float(weight)


def _check_temperature(temperature: float) -> float:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(
            f"temperature must be positive, got temperature={temperature!r}; use temperature=1 for "
            "the plain softmax or a larger value (e.g. 4) for softer targets."
        )
    return float(temperature)


def _as_layers(maps: Tensor | Sequence[Tensor], what: str) -> list[Tensor]:
    if isinstance(maps, Tensor):
        return [maps]
    if not isinstance(maps, Sequence) or not all(isinstance(m, Tensor) for m in maps):
        raise TypeError(f"{what} must be a tensor or a list of tensors (one per layer).")
    if not maps:
        raise ValueError(f"{what} is empty; pass at least one layer.")
    return list(maps)


# --------------------------------------------------------------------------------------------
# Soft labels (Hinton et al. 2015)


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
    _check_temperature(temperature)
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


def ensemble_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """The weights of ``count`` teachers, checked and normalised to sum to 1 (``None``: uniform).

    Example:
        >>> ensemble_weights([3, 1], 2), ensemble_weights(None, 4)
        ([0.75, 0.25], [0.25, 0.25, 0.25, 0.25])
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"an ensemble needs at least one teacher, got count={count!r}.")
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"teacher_weights must be a list of numbers, one per teacher, got {weights!r}."
        )
    values = list(weights)
    if len(values) != count:
        raise ValueError(
            f"teacher_weights has {len(values)} entries for {count} teachers; give one weight per "
            "teacher, in the order of the teachers (or leave teacher_weights out for equal weights)."
        )
    bad = [
        w
        for w in values
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0
    ]
    if bad:
        raise ValueError(
            f"teacher_weights must be non-negative finite numbers, got {values!r}; a weight of 0 "
            "leaves a teacher out."
        )
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(
            f"teacher_weights are all 0 ({values!r}); give at least one teacher a positive weight."
        )
    return [w / total for w in values]


def ensemble_probabilities(
    teacher_logits: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """``Σ_k w_k · softmax(z_k / T)``: the tempered class probabilities of a teacher ensemble.

    Averaging probabilities (not logits) is the ensemble of Hinton et al. (2015), §1, and keeps
    each teacher's scale: a MAML head and a ProtoNet's negative distances need not agree on the
    size of their logits. Pass the result as ``teacher_probs`` of :func:`soft_label_loss` with the
    same ``T``. ``weights`` are checked and normalised by :func:`ensemble_weights` (``None``:
    the plain mean). Uses only tensor operations, so it runs per task under ``vmap``.

    Shapes: every ``teacher_logits[k]`` ``[..., C]`` (the same shape). Returns ``[..., C]``, rows
    summing to 1.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -1e9]])
        >>> ensemble_probabilities([a, b]).tolist()
        [[0.75, 0.25]]
    """
    _check_temperature(temperature)
    if isinstance(teacher_logits, Tensor) or not teacher_logits:
        raise TypeError("teacher_logits must be a non-empty list of tensors, one per teacher.")
    shapes = {tuple(z.shape) for z in teacher_logits}
    if len(shapes) != 1:
        raise ValueError(
            f"the teachers' logits differ in shape: {sorted(shapes)}; every teacher must predict "
            "the same queries and classes (the same ways)."
        )
    w = ensemble_weights(weights, len(teacher_logits))
    probs = [F.softmax(z / temperature, dim=-1) for z in teacher_logits]
    total = w[0] * probs[0]
    for weight, p in zip(w[1:], probs[1:], strict=True):
        total = total + weight * p
    return total


class SoftLabelDistillation(nn.Module):
    """``weight · soft_label_loss(student_logits, teacher_logits, temperature)`` (Hinton et al. 2015).

    Args:
        temperature: softmax temperature ``T > 0``.
        weight: loss weight λ ≥ 0.

    Example:
        >>> import torch
        >>> loss = SoftLabelDistillation(temperature=4.0, weight=0.5)
        >>> float(loss(torch.zeros(3, 5), torch.zeros(3, 5)))
        0.0
    """

    def __init__(self, temperature: float = 4.0, weight: float = 1.0):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.weight = _check_weight(weight)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None = None,
        *,
        teacher_probs: Tensor | None = None,
    ) -> Tensor:
        return self.weight * soft_label_loss(
            student_logits, teacher_logits, self.temperature, teacher_probs=teacher_probs
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight={self.weight}"


# --------------------------------------------------------------------------------------------
# Feature hints (FitNets, Romero et al. 2015)


def feature_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared error between (projected) student features and teacher features.

    The hint loss of FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", §2.2),
    ``‖u_teacher − r(v_student)‖²``, averaged over every element (instead of the paper's ½-sum) so
    that its scale does not depend on the width or the resolution of the tapped layer. The
    regressor ``r`` is :class:`FeatureDistillation`'s projector; this function compares tensors of
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
            "FeatureDistillation(student_dim, teacher_dim), which learns a 1x1 conv or linear map "
            "and resizes feature maps."
        )
    return (student_features - teacher_features).pow(2).mean()


class FeatureDistillation(nn.Module):
    """FitNets hint loss with a learned projector: ``weight · MSE(r(student), teacher)``.

    Romero et al. (2015), "FitNets: Hints for Thin Deep Nets", §2.2: a narrow student cannot
    reproduce a wide teacher's features directly, so a regressor ``r`` maps the student's
    ``student_dim`` channels to the teacher's ``teacher_dim``:

    - ``kind="map"``: feature maps ``[B, C, H, W]``; ``r`` is a 1x1 convolution, and a student map
      whose spatial size differs from the teacher's is resized bilinearly to it.
    - ``kind="vector"``: features in the last dimension, ``[B, D]`` embeddings or ``[B, T, D]``
      token sequences; ``r`` is a linear layer.
    - equal widths: ``r`` is the identity and the module has no parameters.

    The projector's parameters are trainable and must be optimised together with the student (the
    owning LightningModule registers this module as a child, so ``self.parameters()`` holds them).

    Args:
        student_dim: channels (or features) of the student's tapped output.
        teacher_dim: channels (or features) of the teacher's tapped output.
        kind: ``"map"`` or ``"vector"`` (see above).
        weight: loss weight λ ≥ 0.

    Example:
        >>> import torch
        >>> hint = FeatureDistillation(student_dim=16, teacher_dim=64)
        >>> hint(torch.randn(2, 16, 5, 5), torch.randn(2, 64, 5, 5)).shape
        torch.Size([])
        >>> sum(p.numel() for p in hint.parameters())  # 1x1 conv: 64 * 16 weights + 64 biases
        1088
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        kind: Literal["map", "vector"] = "map",
        weight: float = 1.0,
    ):
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
        self.weight = _check_weight(weight)
        if student_dim == teacher_dim:
            self.projector: nn.Module = nn.Identity()
        elif kind == "map":
            self.projector = nn.Conv2d(student_dim, teacher_dim, kernel_size=1)
        else:
            self.projector = nn.Linear(student_dim, teacher_dim)

    def project(self, student_features: Tensor) -> Tensor:
        """``r(student_features)``: the student's features in the teacher's width."""
        if self.kind == "map":
            if student_features.dim() != 4 or student_features.shape[1] != self.student_dim:
                raise ValueError(
                    f"FeatureDistillation(kind='map') expects student maps [B, {self.student_dim}, "
                    f"H, W], got {tuple(student_features.shape)}; use kind='vector' for [..., D] "
                    "features, or check student_dim."
                )
        elif student_features.dim() < 1 or student_features.shape[-1] != self.student_dim:
            raise ValueError(
                f"FeatureDistillation(kind='vector') expects student features [..., "
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
        return self.weight * feature_loss(projected, teacher_features)

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
            f"kind={self.kind!r}, weight={self.weight}"
        )


# --------------------------------------------------------------------------------------------
# Activation-based attention transfer (Zagoruyko & Komodakis 2017)


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
    if not p > 0:
        raise ValueError(
            f"p must be positive (the exponent of |A|), got p={p!r}; the paper uses 2."
        )
    students = _as_layers(student_maps, "student_maps")
    teachers = _as_layers(teacher_maps, "teacher_maps")
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


class AttentionTransfer(nn.Module):
    """``weight · attention_transfer_loss(student_maps, teacher_maps, p)`` (Zagoruyko & Komodakis 2017).

    The paper's β/2 is the ``weight`` here (they use β = 10³ with their mean-over-positions form;
    our sum-over-positions form needs a smaller weight, about ``10³ / (2·H·W)``).

    Example:
        >>> import torch
        >>> at = AttentionTransfer(weight=2.0)
        >>> float(at(torch.ones(1, 4, 3, 3), torch.ones(1, 16, 6, 6)))
        0.0
    """

    def __init__(self, p: float = 2.0, weight: float = 1.0):
        super().__init__()
        if not isinstance(p, (int, float)) or not p > 0:
            raise ValueError(f"p must be positive (the exponent of |A|), got p={p!r}; use p=2.")
        self.p = float(p)
        self.weight = _check_weight(weight)

    def forward(
        self, student_maps: Tensor | Sequence[Tensor], teacher_maps: Tensor | Sequence[Tensor]
    ) -> Tensor:
        return self.weight * attention_transfer_loss(student_maps, teacher_maps, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, weight={self.weight}"


# --------------------------------------------------------------------------------------------
# Attention-map distillation: L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²


def default_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer matched to each student layer: ``round((i + 1) · L_t / L_s) − 1``.

    Student layer ``i`` (0-based) of ``L_s`` is paired with the teacher layer at the same relative
    depth; ``round`` rounds halves up and the index is clipped at 0 (a student deeper than its
    teacher maps several layers to teacher layer 0). The last student layer always meets the last
    teacher layer; equal depths give the identity.

    Example:
        >>> default_layer_map(2, 4), default_layer_map(4, 6), default_layer_map(3, 3)
        ([1, 3], [1, 2, 4, 5], [0, 1, 2])
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(
            f"layer counts must be positive, got student_layers={student_layers}, "
            f"teacher_layers={teacher_layers}."
        )
    # floor(x + 1/2) with x = (i + 1) · L_t / L_s, in integers.
    return [
        max(0, (2 * (i + 1) * teacher_layers + student_layers) // (2 * student_layers) - 1)
        for i in range(student_layers)
    ]


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
    if kind not in ("frobenius", "kl"):
        raise ValueError(f"kind must be 'frobenius' or 'kl', got kind={kind!r}.")
    students = _as_layers(student_attentions, "student_attentions")
    teachers = _as_layers(teacher_attentions, "teacher_attentions")
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


class AttentionDistillation(nn.Module):
    """``weight · attention_map_loss(...)``: the λ Σ_l ‖A_target^l − A_meta^l‖_F² term.

    Add it to the task loss: ``L = L_task + AttentionDistillation(weight=λ)(A_target, A_meta)``.

    Args:
        weight: λ ≥ 0.
        layer_map: optional teacher layer index per student layer (default
            :func:`default_layer_map`).
        kind: ``"frobenius"`` or ``"kl"`` (see :func:`attention_map_loss`).

    Example:
        >>> import torch
        >>> from lightning_metakd.models import VisionTransformer
        >>> teacher = VisionTransformer(embed_dim=32, depth=4, heads=4)
        >>> student = VisionTransformer(embed_dim=16, depth=2, heads=2)
        >>> x = torch.randn(2, 1, 28, 28)
        >>> _, a_meta = teacher(x, return_attention=True)
        >>> _, a_target = student(x, return_attention=True)
        >>> AttentionDistillation(weight=0.1)(a_target, a_meta).shape
        torch.Size([])
    """

    def __init__(
        self,
        weight: float = 1.0,
        layer_map: Sequence[int] | None = None,
        kind: Literal["frobenius", "kl"] = "frobenius",
    ):
        super().__init__()
        if kind not in ("frobenius", "kl"):
            raise ValueError(f"kind must be 'frobenius' or 'kl', got kind={kind!r}.")
        if layer_map is not None:
            if isinstance(layer_map, (str, bytes)) or not isinstance(layer_map, Sequence):
                raise TypeError(f"layer_map must be a list of integers, got {layer_map!r}.")
            layer_map = list(layer_map)
        self.weight = _check_weight(weight)
        self.layer_map, self.kind = layer_map, kind

    def forward(
        self,
        student_attentions: Tensor | Sequence[Tensor],
        teacher_attentions: Tensor | Sequence[Tensor],
    ) -> Tensor:
        return self.weight * attention_map_loss(
            student_attentions, teacher_attentions, self.layer_map, self.kind
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, layer_map={self.layer_map}, kind={self.kind!r}"


# --------------------------------------------------------------------------------------------
# MAML-anchored distillation: L = L_task(θ − α∇θ L'_task(θ)) + λ‖θ − θ*‖²


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
    return adapted_task_loss + _check_weight(weight) * parameter_anchor_loss(params, theta_star)


def _buffer_name(name: str) -> str:
    return name.replace(".", "__")


class ParameterAnchor(nn.Module):
    """``weight · ‖θ − θ*‖²`` with θ* stored as (non-trainable) buffers.

    θ* moves with the module (``.to(device)``) and is saved in checkpoints, but it is never a
    parameter: the optimiser does not see it and no gradient reaches it. Buffer names cannot
    contain ``.``, so ``backbone.features.0.0.weight`` is stored as
    ``store.backbone__features__0__0__weight``; :attr:`theta_star` returns the original names.

    Args:
        theta_star: the anchor ``{name: tensor}`` (e.g. ``slice_state(teacher, student)``, or
            ``dict(teacher.named_parameters())`` for a student of the teacher's width). Copied and
            detached. Non-floating entries (e.g. BatchNorm's ``num_batches_tracked``) are dropped;
            every other entry must be a parameter of the student (a model whose BatchNorm tracks
            running statistics should pass only its parameter names).
        weight: λ ≥ 0.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2)
        >>> anchor = ParameterAnchor(dict(net.named_parameters()), weight=0.1)
        >>> anchor(dict(net.named_parameters())).item()
        0.0
    """

    def __init__(self, theta_star: Mapping[str, Tensor], weight: float = 1.0):
        super().__init__()
        self.weight = _check_weight(weight)
        names = [n for n, t in theta_star.items() if torch.is_floating_point(t)]
        if not names:
            raise ValueError(
                "theta_star holds no floating-point tensors; pass the anchor parameters, e.g. "
                "transfer.slice_state(teacher, student)."
            )
        mapped = [_buffer_name(n) for n in names]
        if len(set(mapped)) != len(mapped):
            raise ValueError(
                "theta_star names collide once '.' is replaced by '__' (buffer names cannot hold "
                f"'.'); rename the parameters: {names}."
            )
        self.names = names
        self.store = nn.Module()
        for n, b in zip(names, mapped, strict=True):
            self.store.register_buffer(b, theta_star[n].detach().clone())

    @property
    def theta_star(self) -> dict[str, Tensor]:
        """θ* as ``{original name: tensor}``."""
        return {n: getattr(self.store, _buffer_name(n)) for n in self.names}

    def forward(self, params: Mapping[str, Tensor]) -> Tensor:
        return self.weight * parameter_anchor_loss(params, self.theta_star)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, anchored={len(self.names)} tensors"


__all__ = [
    "AttentionDistillation",
    "AttentionTransfer",
    "FeatureDistillation",
    "ParameterAnchor",
    "SoftLabelDistillation",
    "attention_map_loss",
    "attention_transfer_loss",
    "default_layer_map",
    "ensemble_probabilities",
    "ensemble_weights",
    "feature_loss",
    "maml_anchored_distillation_loss",
    "parameter_anchor_loss",
    "soft_label_loss",
    "spatial_attention",
]

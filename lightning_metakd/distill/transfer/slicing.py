"""θ* transfer: initialise a narrower student from the teacher by structured channel slicing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_metakd.distill.transfer.selection import Axis, ChannelSelection, resolve_selection
from lightning_metakd.distill.transfer.structure import structure
from lightning_metakd.models.classifier import Classifier


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, in ascending index order (ties: lower index first)."""
    order = scores.argsort(descending=True, stable=True)[:k]
    return order.sort().values


def slice_state(
    teacher: nn.Module,
    student: nn.Module,
    selection: str | ChannelSelection = "bn_gamma",
    *,
    blocks: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """The teacher's meta-learned state θ* cut down to the student's widths.

    Every set of units the student has fewer of — a conv layer's output channels, a ViT's
    residual-stream channels, attention heads or MLP units — is ranked by ``selection`` and the
    student's count of the best units is kept, in their original order. The same indices are
    kept everywhere the units appear: the producing weights and biases, the BatchNorm or
    LayerNorm parameters (and running statistics, if any), the inputs of the next layer, and the
    input features of a ``Linear`` head (``Classifier.head``; for Conv4 the flattened embedding is
    ordered channel × spatial, so channel ``c`` owns features ``c·h·w … c·h·w+h·w−1``).

    Rules (:mod:`~lightning_metakd.distill.transfer.selection`): ``"bn_gamma"`` (default; the
    ``|γ|`` of the BatchNorm after each conv, Liu et al. 2017), ``"l1"`` (filter L1 norm, Li et
    al. 2017 — the former rule, meaningless before a batch-statistics BatchNorm, where scaling
    a filter does not change the output), ``"random"`` (seed 0; ``RandomChannels(seed)`` for
    others), and the data-driven :class:`~lightning_metakd.distill.transfer.MeanActivation`
    ``(images)`` and :class:`~lightning_metakd.distill.transfer.TaylorImportance`
    ``(episodes, algorithm)``. ``bn_gamma`` is the default: it needs no data and it was the best
    (or, once, tied-best) rule on all four Conv4 ProtoNet pairs measured with no training after
    slicing — on 600 within-radical KanjiVG 5-way 1-shot episodes, Conv4-32 → Conv4-8 scored
    59.9% against 41.7% for random channels (mean of 10 seeds, paired +18.2 ± 0.9 points),
    40.6% for ``l1``, 42.0% for mean activation and 42.4% for Taylor importance
    (``benchmarks/theta_star.py``, ``benchmarks/results/theta_star.json``).

    Families (the student of the teacher's family, depth and input channels):

    - :class:`~lightning_metakd.models.Conv4`: one set per block.
    - :class:`~lightning_metakd.models.ResNet12`: the two inner convs of a block are ranked on
      their own; the output channels are shared by the third conv and the 1x1 shortcut (their
      outputs are added), so both rank them jointly (``bn_gamma``: ``|γ|`` of both BatchNorms
      summed) and the next block's first conv and shortcut read exactly those channels.
    - :class:`~lightning_metakd.models.VisionTransformer`: the same ``patch_size`` and
      ``image_size``, and the same ``head_dim`` (``embed_dim / heads``): heads are kept whole, so
      a kept head computes the teacher head's attention with the same ``1/√d`` scale, and the
      student's ``embed_dim`` follows from its ``heads``. The residual-stream channels (patch
      embedding, class token, position embeddings, every LayerNorm, the attention and MLP output
      rows) form one set, ranked under ``bn_gamma`` by the sum of ``|γ|`` of every LayerNorm that
      reads the stream; heads and MLP units have no normalisation of their own and are ranked by
      the L1 norm of their q/k/v rows and first-layer rows under ``bn_gamma`` and ``l1``. A
      shallower student takes the teacher blocks ``blocks`` (default
      :func:`~lightning_metakd.distill.default_layer_map`: the blocks attention distillation
      pairs it with, e.g. 2 of 4 → blocks 1 and 3, every other block as in DistilBERT, Sanh et
      al. 2019); ``list(range(depth))`` takes the first ones.

    Across algorithms: a bare backbone teacher (ProtoNet, MatchingNet) may give θ* to a
    ``Classifier`` student (MAML, ANIL, Meta-SGD) — the backbone is sliced and the student keeps
    its own (freshly initialised) head — and a ``Classifier`` teacher to a bare student (the head
    is dropped). Both wrapped: the head is sliced too and ``ways`` must match.

    A student as wide (and deep) as its teacher gets exactly the teacher's state, bit for bit,
    whatever the rule. Rules score the teacher in ``eval()`` mode (no dropout); its mode is
    restored afterwards.

    Args:
        teacher: the meta-trained teacher (θ*), bare or in a ``Classifier``.
        student: a freshly built student of the same family, at most as wide as the teacher.
        selection: a rule name (``"bn_gamma"``, ``"l1"``, ``"random"``) or rule object.
        blocks: ViT only: the teacher block each student block starts from.

    Returns:
        ``{name: tensor}`` with exactly the keys and shapes of ``student.state_dict()``, in its
        order: pass it to ``student.load_state_dict`` and to
        :class:`~lightning_metakd.distill.ParameterAnchor` as θ*. Tensors are detached
        copies.

    Raises:
        ValueError: an unknown rule (the valid ones are named), different families, depths,
            input channels, patch sizes, head sizes or ``ways``, a student wider than the
            teacher, or any resulting shape that differs from the student's (named).

    Example:
        >>> import torch
        >>> from lightning_metakd.models import Conv4
        >>> from lightning_metakd.models.classifier import Classifier
        >>> teacher = Conv4(hidden=64)                     # a ProtoNet teacher: bare backbone
        >>> student = Classifier(Conv4(hidden=16), ways=5)  # a MAML student with its own head
        >>> theta_star = slice_state(teacher, student)     # the 16 largest-|γ| channels per block
        >>> theta_star["backbone.features.1.0.weight"].shape
        torch.Size([16, 16, 3, 3])
        >>> torch.equal(theta_star["head.weight"], student.head.weight)
        True
        >>> student.load_state_dict(theta_star)
        <All keys matched successfully>
    """
    rule = resolve_selection(selection)
    t_wrapped, s_wrapped = isinstance(teacher, Classifier), isinstance(student, Classifier)
    t_net = teacher.backbone if t_wrapped else teacher
    s_net = student.backbone if s_wrapped else student
    t_prefix, s_prefix = "backbone." * t_wrapped, "backbone." * s_wrapped
    found = structure(t_net, s_net, t_prefix, blocks)
    sizes = {s.name: s.size for s in found.sets}
    if t_wrapped and s_wrapped and teacher.head.out_features != student.head.out_features:
        raise ValueError(
            f"teacher head has ways={teacher.head.out_features} outputs, student head "
            f"ways={student.head.out_features}; build the student with the teacher's ways (or "
            "give it the bare backbone to keep its own head: see slice_state's docs)."
        )
    if t_wrapped and s_wrapped:
        embedding = next(s for s in found.sets if s.name == found.embedding)
        if student.head.in_features != embedding.keep * found.spatial:
            raise ValueError(
                f"student head.weight reads {student.head.in_features} features but the sliced "
                f"teacher embedding has {embedding.keep * found.spatial} ({embedding.keep} "
                f"channels x {found.spatial} positions); build the student with the teacher's "
                "image_size."
            )

    training = teacher.training
    try:  # data-driven scores without dropout noise; our BatchNorms use batch statistics anyway
        scores = rule.scores(teacher.eval(), found.sets)
    finally:
        teacher.train(training)
    kept = {}
    for units, score in zip(found.sets, scores, strict=True):
        if score.shape != (units.size,) or not torch.isfinite(score).all():
            raise ValueError(
                f"{rule!r} gave {units.name} scores of shape {tuple(score.shape)} "
                f"(non-finite: {int((~torch.isfinite(score)).sum())}); expected {units.size} "
                "finite values. Check the teacher's parameters and the rule's data."
            )
        kept[units.name] = _top(score.cpu(), units.keep)

    t_state = teacher.state_dict()
    state = {}
    for key, own in student.state_dict().items():
        if s_wrapped and key.startswith("head.") and not t_wrapped:
            state[key] = own.detach().clone()  # the student's own head
            continue
        if key.startswith("head."):
            source = key
            cuts = ((found.embedding, 1, found.spatial, 1),) if key == "head.weight" else ()
        else:
            relative = key.removeprefix(s_prefix)
            source, cuts = found.plan.get(relative, (relative, ()))
            source = t_prefix + source
        if source not in t_state:
            raise ValueError(
                f"the student's {key} has no counterpart {source} in the teacher; build the "
                "student with the teacher's architecture except the widths."
            )
        value = t_state[source].detach()
        for name, dim, group, parts in cuts:
            indices = Axis(source, dim, group, parts).indices(kept[name], sizes[name])
            value = value.index_select(dim, indices.to(value.device))
        state[key] = value.clone()

    mismatched = [
        f"{n}: sliced {tuple(state[n].shape)} vs student {tuple(t.shape)}"
        for n, t in student.state_dict().items()
        if state[n].shape != t.shape
    ]
    if mismatched:
        raise ValueError(
            f"sliced teacher shapes do not fit the student: {'; '.join(mismatched[:3])}; build the "
            "student with the teacher's constructor arguments except the width."
        )
    return state


__all__ = ["slice_state"]

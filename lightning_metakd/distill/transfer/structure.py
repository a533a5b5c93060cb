"""What each backbone family exposes to θ* slicing: its sets of units and where their indices go.

For a teacher/student pair of one family, a :class:`Structure` lists the teacher's
:class:`~lightning_metakd.distill.transfer.selection.ChannelSet` s (what a selection rule scores)
and a plan: for every tensor of the student, the teacher tensor it is cut from and, per axis,
the set whose kept units index that axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import nn

from lightning_metakd.distill.taps import default_layer_map
from lightning_metakd.distill.transfer.selection import Axis, ChannelSet, Tap
from lightning_metakd.models import Conv4, ResNet12, VisionTransformer

#: A cut: (set name, dim, group, parts) — see :class:`Axis`.
Cut = tuple[str, int, int, int]
#: student tensor name → (teacher tensor name, cuts); both relative to the backbone.
Plan = dict[str, tuple[str, tuple[Cut, ...]]]


class Structure(NamedTuple):
    """A family's answer for one teacher/student pair (names of ``sets`` carry the prefix)."""

    sets: list[ChannelSet]
    plan: Plan
    embedding: str  #: the set whose units make up the embedding (``num_features``)
    spatial: int  #: embedding features per unit (Conv4: ``h·w`` of the last map; else 1)


def _keep(name: str, what: str, teacher: int, student: int) -> int:
    if student > teacher:
        raise ValueError(
            f"student {name} has {student} {what} but the teacher's has only {teacher}; a "
            "student built from θ* must be at most as wide as its teacher (width <= 1)."
        )
    return student


def _conv_set(name: str, size: int, keep: int, convs: Sequence[str], bns: Sequence[str],
              tap: str) -> ChannelSet:  # fmt: skip
    """Output channels written by ``convs``, each followed by one of ``bns``, read at ``tap``."""
    return ChannelSet(
        name,
        size,
        keep,
        filters=tuple(Axis(c + ".weight") for c in convs),
        gates=tuple(Axis(b + ".weight") for b in bns),
        writers=tuple(Axis(b + suffix) for b in bns for suffix in (".weight", ".bias")),
        taps=(Tap(tap, dim=1),),
    )


def _add_conv(plan: Plan, conv: str, out: str, inp: str | None, bias: bool) -> None:
    cuts: tuple[Cut, ...] = ((out, 0, 1, 1),) if inp is None else ((out, 0, 1, 1), (inp, 1, 1, 1))
    plan[conv + ".weight"] = (conv + ".weight", cuts)
    if bias:
        plan[conv + ".bias"] = (conv + ".bias", ((out, 0, 1, 1),))


def _add_norm(plan: Plan, path: str, norm: nn.Module, channels: str) -> None:
    for name, value in norm.state_dict().items():
        if value.dim() == 1:  # weight, bias and, when tracked, running_mean / running_var
            plan[f"{path}.{name}"] = (f"{path}.{name}", ((channels, 0, 1, 1),))


def conv4_structure(teacher: Conv4, student: Conv4, prefix: str) -> Structure:
    """One set per block: the conv's output channels, gated by the BatchNorm after it."""
    sets, plan, previous = [], {}, None
    for i, (t_block, s_block) in enumerate(zip(teacher.features, student.features, strict=True)):
        p, conv = f"features.{i}.", f"features.{i}.0"
        size = t_block[0].out_channels
        keep = _keep(conv, "output channels", size, s_block[0].out_channels)
        q = prefix + p
        sets.append(_conv_set(conv, size, keep, [q + "0"], [q + "1"], q + "2"))
        _add_conv(plan, conv, conv, previous, t_block[0].bias is not None)
        _add_norm(plan, p + "1", t_block[1], conv)
        previous = conv
    return Structure(sets, plan, previous, teacher.num_features // teacher.channels)


def resnet12_structure(teacher: ResNet12, student: ResNet12, prefix: str) -> Structure:
    """Three sets per block: the two inner convs' channels, and the output channels shared by the
    third conv and the 1x1 shortcut (added, so ranked jointly and read by the next block)."""
    sets, plan, previous = [], {}, None
    for i, (t_block, s_block) in enumerate(zip(teacher.features, student.features, strict=True)):
        p = f"features.{i}."
        q = prefix + p
        t_body, s_body = t_block.body, s_block.body
        inner = []
        for conv, bn, act in ((0, 1, 2), (3, 4, 5)):
            name = f"{p}body.{conv}"
            size = t_body[conv].out_channels
            keep = _keep(name, "output channels", size, s_body[conv].out_channels)
            sets.append(
                _conv_set(
                    name, size, keep, [f"{q}body.{conv}"], [f"{q}body.{bn}"], f"{q}body.{act}"
                )
            )
            inner.append(name)
        out = f"{p}body.6"
        size = t_body[6].out_channels
        keep = _keep(out, "output channels", size, s_body[6].out_channels)
        sets.append(
            _conv_set(out, size, keep, [q + "body.6", q + "shortcut.0"],
                      [q + "body.7", q + "shortcut.1"], q + "activation")
        )  # fmt: skip
        _add_conv(plan, p + "body.0", inner[0], previous, bias=False)
        _add_norm(plan, p + "body.1", t_body[1], inner[0])
        _add_conv(plan, p + "body.3", inner[1], inner[0], bias=False)
        _add_norm(plan, p + "body.4", t_body[4], inner[1])
        _add_conv(plan, p + "body.6", out, inner[1], bias=False)
        _add_norm(plan, p + "body.7", t_body[7], out)
        _add_conv(plan, p + "shortcut.0", out, previous, bias=False)
        _add_norm(plan, p + "shortcut.1", t_block.shortcut[1], out)
        previous = out
    return Structure(sets, plan, previous, 1)


def vit_blocks(teacher: VisionTransformer, student: VisionTransformer,
               blocks: Sequence[int] | None) -> list[int]:  # fmt: skip
    """The teacher block each student block starts from (default: :func:`default_layer_map`)."""
    if student.depth > teacher.depth:
        raise ValueError(
            f"the student has {student.depth} blocks but the teacher only {teacher.depth}; build "
            "the student at most as deep as its teacher."
        )
    mapped = default_layer_map(student.depth, teacher.depth) if blocks is None else list(blocks)
    valid = all(isinstance(b, int) and 0 <= b < teacher.depth for b in mapped)
    if len(mapped) != student.depth or not valid or sorted(set(mapped)) != mapped:
        raise ValueError(
            f"blocks={blocks!r} must list {student.depth} increasing teacher block indices in "
            f"0..{teacher.depth - 1}, one per student block (e.g. "
            f"{list(range(student.depth))} for the first {student.depth})."
        )
    return mapped


def vit_structure(teacher: VisionTransformer, student: VisionTransformer, prefix: str,
                  blocks: Sequence[int] | None) -> Structure:  # fmt: skip
    """Sets: the residual stream's channels (shared by every block), and per kept block its heads
    (whole: ``head_dim`` must match) and its MLP units."""
    for attr in ("patch_size", "image_size"):
        if getattr(teacher, attr) != getattr(student, attr):
            raise ValueError(
                f"teacher {attr}={getattr(teacher, attr)} but student {attr}="
                f"{getattr(student, attr)}; patches and position embeddings are copied, so build "
                f"the student with the teacher's {attr}."
            )
    head_dim = teacher.embed_dim // teacher.heads
    if student.embed_dim != student.heads * head_dim:
        fix = (
            f"heads={student.embed_dim // head_dim}"
            if student.embed_dim % head_dim == 0
            else f"embed_dim={student.heads * head_dim}"
        )
        raise ValueError(
            f"student head_dim is {student.embed_dim / student.heads:g} but the teacher's is "
            f"{head_dim}: heads are kept whole, so the student needs embed_dim = heads x "
            f"{head_dim}; build it with {fix} (and width=1)."
        )
    mapped = vit_blocks(teacher, student, blocks)
    norms = [f"blocks.{b}.norm{k}" for b in mapped for k in (1, 2)] + ["norm"]
    keep = _keep("embed_dim", "channels", teacher.embed_dim, student.embed_dim)
    sets = [
        ChannelSet(
            "embedding",
            teacher.embed_dim,
            keep,
            filters=(Axis(prefix + "patch_embed.weight"),),
            gates=tuple(Axis(f"{prefix}{n}.weight") for n in norms),
            writers=tuple(Axis(f"{prefix}{n}.{w}") for n in norms for w in ("weight", "bias")),
            taps=tuple(Tap(prefix + n, dim=-1) for n in norms),
        )
    ]
    emb = ((sets[0].name, 0, 1, 1),)
    plan: Plan = {
        "patch_embed.weight": ("patch_embed.weight", emb),
        "patch_embed.bias": ("patch_embed.bias", emb),
        "cls_token": ("cls_token", (("embedding", 2, 1, 1),)),
        "pos_embed": ("pos_embed", (("embedding", 2, 1, 1),)),
        "norm.weight": ("norm.weight", emb),
        "norm.bias": ("norm.bias", emb),
    }
    for i, b in enumerate(mapped):
        t_block, s_block = teacher.blocks[b], student.blocks[i]
        t, s, q = f"blocks.{b}.", f"blocks.{i}.", f"{prefix}blocks.{b}."
        heads, mlp = t + "attention", t + "mlp"
        sets.append(
            ChannelSet(
                heads,
                teacher.heads,
                _keep(s + "attention", "heads", teacher.heads, student.heads),
                filters=(Axis(q + "attention.qkv.weight", 0, head_dim, parts=3),),
                gates=(),
                writers=(Axis(q + "attention.proj.weight", 1, head_dim),),
                taps=(Tap(q + "attention.proj", -1, head_dim, input=True),),
            )
        )
        hidden = t_block.mlp[0].out_features
        sets.append(
            ChannelSet(
                mlp,
                hidden,
                _keep(s + "mlp", "hidden units", hidden, s_block.mlp[0].out_features),
                filters=(Axis(q + "mlp.0.weight"),),
                gates=(),
                writers=(Axis(q + "mlp.2.weight", 1),),
                taps=(Tap(q + "mlp.1", -1),),
            )
        )
        qkv = ((heads, 0, head_dim, 3),)
        for k in (1, 2):
            for w in ("weight", "bias"):
                plan[f"{s}norm{k}.{w}"] = (f"{t}norm{k}.{w}", emb)
        cuts: dict[str, tuple[Cut, ...]] = {
            "attention.qkv.weight": qkv + (("embedding", 1, 1, 1),),
            "attention.qkv.bias": qkv,
            "attention.proj.weight": emb + ((heads, 1, head_dim, 1),),
            "attention.proj.bias": emb,
            "mlp.0.weight": ((mlp, 0, 1, 1), ("embedding", 1, 1, 1)),
            "mlp.0.bias": ((mlp, 0, 1, 1),),
            "mlp.2.weight": emb + ((mlp, 1, 1, 1),),
            "mlp.2.bias": emb,
        }
        for name, cut in cuts.items():
            plan[s + name] = (t + name, cut)
    return Structure(sets, plan, "embedding", 1)


def structure(teacher: nn.Module, student: nn.Module, prefix: str,
              blocks: Sequence[int] | None = None) -> Structure:  # fmt: skip
    """The :class:`Structure` of a teacher/student backbone pair, or a ``ValueError`` naming what
    differs (family, depth, input channels)."""
    families = (Conv4, ResNet12, VisionTransformer)
    if type(teacher) is not type(student) or not isinstance(teacher, families):
        raise ValueError(
            "slice_state supports a Conv4 or ResNet12 (or VisionTransformer) teacher and a "
            "student of the same family (either may be wrapped in Classifier); got teacher "
            f"{type(teacher).__name__} and student {type(student).__name__}."
        )
    if teacher.in_channels != student.in_channels:
        raise ValueError(
            f"teacher in_channels={teacher.in_channels} but student "
            f"in_channels={student.in_channels}; both must read the same images."
        )
    if isinstance(teacher, VisionTransformer):
        return vit_structure(teacher, student, prefix, blocks)
    if blocks is not None:
        raise ValueError(
            f"blocks={blocks!r} picks VisionTransformer blocks; a {type(teacher).__name__} "
            "student keeps every block of its teacher, so leave blocks=None."
        )
    if len(teacher.features) != len(student.features):
        raise ValueError(
            f"teacher and student depths differ ({len(teacher.features)} vs "
            f"{len(student.features)} blocks in `features`); only the width may differ."
        )
    if isinstance(teacher, Conv4):
        return conv4_structure(teacher, student, prefix)
    return resnet12_structure(teacher, student, prefix)


__all__ = ["Structure", "structure", "vit_blocks"]

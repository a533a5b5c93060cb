"""θ* transfer: initialise a narrower student from the teacher by structured channel slicing.

A student of the same family but smaller width (``Conv4(hidden=16)`` for a ``Conv4(hidden=64)``
teacher, ``ResNet12(width=0.5)`` for ``ResNet12()``) starts from the teacher's meta-learned θ*
restricted to the teacher's most important filters, ranked by the L1 norm of their weights
(Li et al. 2017, "Pruning Filters for Efficient ConvNets", §3.1). The sliced state is both the
student's initialisation and the anchor θ* of MAML-anchored distillation
(:class:`~lightning_metakd.distill.losses.ParameterAnchor`).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_metakd.models import Conv4, ResNet12
from lightning_metakd.models.classifier import Classifier

# name → (indices kept along dim 0, indices kept along dim 1); None keeps the whole dimension.
_Plan = dict[str, tuple[Tensor | None, Tensor | None]]


def _filter_l1(conv: nn.Conv2d) -> Tensor:
    """L1 norm of each output filter: ``Σ |W[o, :, :, :]|``, shape ``[out_channels]``."""
    return conv.weight.detach().abs().flatten(1).sum(1)


def _keep(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, in ascending index order (ties: lower index first)."""
    order = scores.argsort(descending=True, stable=True)[:k]
    return order.sort().values


def _check_width(name: str, teacher_conv: nn.Conv2d, student_conv: nn.Conv2d) -> int:
    k, available = student_conv.out_channels, teacher_conv.out_channels
    if k > available:
        raise ValueError(
            f"student {name} has {k} output channels but the teacher's has only {available}; a "
            "student built from θ* must be at most as wide as its teacher (width <= 1)."
        )
    return k


def _add_bn(plan: _Plan, prefix: str, bn: nn.Module, keep: Tensor) -> None:
    for name, value in bn.state_dict().items():
        if value.dim() == 1:  # weight, bias and, when tracked, running_mean / running_var
            plan[prefix + name] = (keep, None)


def _plan_conv4(teacher: Conv4, student: Conv4, prefix: str) -> tuple[_Plan, Tensor]:
    plan: _Plan = {}
    previous: Tensor | None = None
    for i, (t_block, s_block) in enumerate(zip(teacher.features, student.features, strict=True)):
        p = f"{prefix}features.{i}."
        k = _check_width(f"{p}0", t_block[0], s_block[0])
        keep = _keep(_filter_l1(t_block[0]), k)
        plan[p + "0.weight"] = (keep, previous)
        if t_block[0].bias is not None:
            plan[p + "0.bias"] = (keep, None)
        _add_bn(plan, p + "1.", t_block[1], keep)
        previous = keep
    return plan, previous


def _plan_resnet12(teacher: ResNet12, student: ResNet12, prefix: str) -> tuple[_Plan, Tensor]:
    plan: _Plan = {}
    previous: Tensor | None = None
    for i, (t_block, s_block) in enumerate(zip(teacher.features, student.features, strict=True)):
        p = f"{prefix}features.{i}."
        t_body, s_body = t_block.body, s_block.body
        keep1 = _keep(_filter_l1(t_body[0]), _check_width(f"{p}body.0", t_body[0], s_body[0]))
        keep2 = _keep(_filter_l1(t_body[3]), _check_width(f"{p}body.3", t_body[3], s_body[3]))
        # conv3 and the shortcut write the same output channels (they are added): rank them jointly.
        k = _check_width(f"{p}body.6", t_body[6], s_body[6])
        out = _keep(_filter_l1(t_body[6]) + _filter_l1(t_block.shortcut[0]), k)
        plan[p + "body.0.weight"] = (keep1, previous)
        _add_bn(plan, p + "body.1.", t_body[1], keep1)
        plan[p + "body.3.weight"] = (keep2, keep1)
        _add_bn(plan, p + "body.4.", t_body[4], keep2)
        plan[p + "body.6.weight"] = (out, keep2)
        _add_bn(plan, p + "body.7.", t_body[7], out)
        plan[p + "shortcut.0.weight"] = (out, previous)
        _add_bn(plan, p + "shortcut.1.", t_block.shortcut[1], out)
        previous = out
    return plan, previous


def _check_family(teacher: nn.Module, student: nn.Module) -> None:
    if type(teacher) is not type(student) or not isinstance(teacher, (Conv4, ResNet12)):
        raise ValueError(
            f"slice_state supports a Conv4 or ResNet12 teacher and a student of the same family "
            f"(optionally both wrapped in Classifier); got teacher {type(teacher).__name__} and "
            f"student {type(student).__name__}."
        )
    if len(teacher.features) != len(student.features):
        raise ValueError(
            f"teacher and student depths differ ({len(teacher.features)} vs "
            f"{len(student.features)} blocks in `features`); only the width may differ."
        )
    if teacher.in_channels != student.in_channels:
        raise ValueError(
            f"teacher in_channels={teacher.in_channels} but student "
            f"in_channels={student.in_channels}; both must read the same images."
        )


def slice_state(teacher: nn.Module, student: nn.Module) -> dict[str, Tensor]:
    """The teacher's state sliced to the student's widths, keeping the largest-L1 filters.

    For every conv layer the teacher's output filters are ranked by the L1 norm of their weights
    (Li et al. 2017, §3.1) and the student's channel count ``k`` of them is kept, in ascending
    original order. The same channels are kept in the layer's bias and BatchNorm affine parameters
    (and running statistics, if any), in the input channels of the next conv and in the input
    features of a following ``Linear`` head (``Classifier.head``; for Conv4 the flattened
    embedding is ordered channel × spatial, so channel ``c`` owns features ``c·h·w … c·h·w+h·w−1``).

    Supported families: :class:`~lightning_metakd.models.Conv4` and
    :class:`~lightning_metakd.models.ResNet12`, bare or both inside
    :class:`~lightning_metakd.models.classifier.Classifier`. In a ResNet-12 block the output
    channels are shared by the third conv and the 1x1 shortcut (their outputs are added), so they
    are ranked by the sum of both filters' L1 norms, and the next block's first conv and shortcut
    read exactly those channels. The two inner convs of a block are ranked on their own.

    A student of the teacher's width gets exactly the teacher's state (every channel, in order).

    Args:
        teacher: the meta-trained teacher (θ*).
        student: a freshly built student of the same family, depth, input channels (and ``ways``
            and, for a Conv4 classifier, image size), at most as wide as the teacher.

    Returns:
        ``{name: tensor}`` with exactly the keys and shapes of ``student.state_dict()``: pass it to
        ``student.load_state_dict`` and to
        :class:`~lightning_metakd.distill.losses.ParameterAnchor` as θ*. Tensors are detached
        copies.

    Raises:
        ValueError: different families, depths, input channels or ``ways``, a student wider than
            the teacher, or any resulting shape that differs from the student's (named).

    Example:
        >>> import torch
        >>> from lightning_metakd.models import Conv4
        >>> from lightning_metakd.models.classifier import Classifier
        >>> teacher = Classifier(Conv4(hidden=64), ways=5)
        >>> student = Classifier(Conv4(hidden=16), ways=5)
        >>> theta_star = slice_state(teacher, student)
        >>> theta_star["backbone.features.1.0.weight"].shape
        torch.Size([16, 16, 3, 3])
        >>> student.load_state_dict(theta_star)
        <All keys matched successfully>
    """
    if isinstance(teacher, Classifier) != isinstance(student, Classifier):
        raise ValueError(
            f"teacher is a {type(teacher).__name__} and student a {type(student).__name__}; wrap "
            "both in Classifier(backbone, ways) or neither."
        )
    wrapped = isinstance(teacher, Classifier)
    t_net, s_net = (teacher.backbone, student.backbone) if wrapped else (teacher, student)
    prefix = "backbone." if wrapped else ""
    _check_family(t_net, s_net)
    if isinstance(t_net, Conv4):
        plan, last = _plan_conv4(t_net, s_net, prefix)
    else:
        plan, last = _plan_resnet12(t_net, s_net, prefix)

    if wrapped:
        t_head, s_head = teacher.head, student.head
        if t_head.out_features != s_head.out_features:
            raise ValueError(
                f"teacher head has ways={t_head.out_features} outputs, student head "
                f"ways={s_head.out_features}; build the student with the teacher's ways."
            )
        # Conv4 flattens [C, h, w] (h·w features per channel); ResNet12 average-pools to [C].
        spatial = t_net.num_features // t_net.channels if isinstance(t_net, Conv4) else 1
        if s_head.in_features != len(last) * spatial:
            raise ValueError(
                f"student head.weight reads {s_head.in_features} features but the sliced teacher "
                f"embedding has {len(last) * spatial} ({len(last)} channels x {spatial} positions); "
                "build the student with the teacher's image_size."
            )
        columns = (last[:, None] * spatial + last.new_tensor(range(spatial))[None, :]).flatten()
        plan["head.weight"] = (None, columns)

    state = {}
    for name, value in teacher.state_dict().items():
        out, inp = plan.get(name, (None, None))
        value = value.detach()
        if out is not None:
            value = value.index_select(0, out.to(value.device))
        if inp is not None:
            value = value.index_select(1, inp.to(value.device))
        state[name] = value.clone()

    expected = student.state_dict()
    if set(expected) != set(state):
        raise ValueError(
            "teacher and student state names differ: missing "
            f"{sorted(set(expected) - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - set(expected))[:3]}; use the same architecture."
        )
    mismatched = [
        f"{n}: sliced {tuple(state[n].shape)} vs student {tuple(t.shape)}"
        for n, t in expected.items()
        if state[n].shape != t.shape
    ]
    if mismatched:
        raise ValueError(
            f"sliced teacher shapes do not fit the student: {'; '.join(mismatched[:3])}; build the "
            "student with the teacher's constructor arguments except the width."
        )
    return state


__all__ = ["slice_state"]

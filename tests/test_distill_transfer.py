"""θ* transfer by L1 channel slicing, and taps by module path (forward hooks, vmap-safe)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_metakd.distill import parameter_anchor_loss, slice_state
from lightning_metakd.models import Conv4, ResNet12, VisionTransformer
from lightning_metakd.models.classifier import Classifier

RESNET_WIDTHS = (4, 6, 8, 10)


def _assert_same_state(state: dict, reference: dict) -> None:
    assert list(state) == list(reference)
    for name, value in reference.items():
        assert torch.equal(state[name], value), name


# ---------------------------------------------------------------------------------------------
# full width: the "slice" is the teacher


@pytest.mark.parametrize(
    "build",
    [
        lambda: Conv4(hidden=8, image_size=28),
        lambda: Classifier(Conv4(hidden=8, image_size=32), ways=3),
        lambda: ResNet12(in_channels=1, widths=RESNET_WIDTHS, image_size=16),
        lambda: Classifier(ResNet12(in_channels=1, widths=RESNET_WIDTHS, image_size=16), ways=3),
    ],
    ids=["conv4", "classifier-conv4", "resnet12", "classifier-resnet12"],
)
def test_full_width_slice_reproduces_teacher(build):
    torch.manual_seed(0)
    teacher, student = build(), build()
    state = slice_state(teacher, student)
    _assert_same_state(state, teacher.state_dict())
    student.load_state_dict(state)
    side = 32 if isinstance(getattr(teacher, "backbone", teacher), Conv4) else 16
    x = torch.randn(4, 1, side, side)
    assert torch.equal(student(x), teacher(x))
    assert all(state[n].data_ptr() != p.data_ptr() for n, p in teacher.named_parameters())


# ---------------------------------------------------------------------------------------------
# slicing keeps the largest-L1 filters


def _scale_filters(conv: nn.Conv2d, scales: list[float]) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.ones_like(conv.weight) * torch.tensor(scales).view(-1, 1, 1, 1))


def test_conv4_slicing_keeps_largest_l1_filters():
    torch.manual_seed(0)
    teacher = Classifier(Conv4(hidden=8, image_size=32), ways=3)
    student = Classifier(Conv4(hidden=4, image_size=32), ways=3)
    # Block 0: filter magnitudes 1, 8, 2, 7, 3, 6, 4, 5 → the four largest are 1, 3, 5, 7.
    # Block 1: random weights, except filter 0 made the largest and filter 6 the second.
    _scale_filters(teacher.backbone.features[0][0], [1, 8, 2, 7, 3, 6, 4, 5])
    with torch.no_grad():
        conv1 = teacher.backbone.features[1][0]
        conv1.weight[0] += 100.0
        conv1.weight[6] -= 50.0
    state = slice_state(teacher, student)
    t = teacher.state_dict()
    keep0 = torch.tensor([1, 3, 5, 7])
    assert torch.equal(
        state["backbone.features.0.0.weight"], t["backbone.features.0.0.weight"][keep0]
    )
    assert torch.equal(state["backbone.features.0.0.bias"], t["backbone.features.0.0.bias"][keep0])
    assert torch.equal(
        state["backbone.features.0.1.weight"], t["backbone.features.0.1.weight"][keep0]
    )
    keep1 = _keep_of(conv1, 4)
    assert {0, 6} <= set(keep1.tolist())
    assert torch.equal(
        state["backbone.features.1.0.weight"],
        t["backbone.features.1.0.weight"][keep1][:, keep0],
    )
    # Head: 32 px → 2x2 maps, so channel c owns embedding features 4c .. 4c+3.
    keep3 = _keep_of(teacher.backbone.features[3][0], 4)
    columns = (keep3[:, None] * 4 + torch.arange(4)).flatten()
    assert torch.equal(state["head.weight"], t["head.weight"][:, columns])
    assert torch.equal(state["head.bias"], t["head.bias"])
    student.load_state_dict(state)


def _deaden(teacher_net: nn.Module, convs_and_bns: list[tuple[nn.Conv2d, nn.Module]], keep: int):
    """Make every channel >= keep of each (conv, bn) pair small in L1 and exactly zero after BN."""
    with torch.no_grad():
        for conv, bn in convs_and_bns:
            conv.weight[keep:] *= 0.01
            bn.weight[keep:] = 0.0
            bn.bias[keep:] = 0.0


def test_conv4_student_reproduces_teacher_with_dead_channels():
    # Channels the teacher never uses (BatchNorm γ = β = 0, small filters) are exactly the ones
    # slicing drops, so the narrower student computes the same function as the teacher.
    torch.manual_seed(1)
    teacher = Classifier(Conv4(hidden=8, image_size=32), ways=5)
    student = Classifier(Conv4(hidden=3, image_size=32), ways=5)
    _deaden(teacher, [(block[0], block[1]) for block in teacher.backbone.features], keep=3)
    student.load_state_dict(slice_state(teacher, student))
    x = torch.randn(6, 1, 32, 32)
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-6)


def test_resnet12_student_reproduces_teacher_with_dead_channels():
    torch.manual_seed(2)
    teacher = Classifier(ResNet12(in_channels=1, widths=(6, 8, 10, 12), image_size=16), ways=3)
    student = Classifier(ResNet12(in_channels=1, widths=(3, 4, 5, 6), image_size=16), ways=3)
    for t_block, s_block in zip(teacher.backbone.features, student.backbone.features, strict=True):
        k = s_block.body[0].out_channels
        pairs = [(t_block.body[i], t_block.body[i + 1]) for i in (0, 3, 6)]
        _deaden(teacher, [*pairs, (t_block.shortcut[0], t_block.shortcut[1])], keep=k)
    state = slice_state(teacher, student)
    student.load_state_dict(state)
    x = torch.randn(5, 1, 16, 16)
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-6)
    assert state["backbone.features.1.shortcut.0.weight"].shape == (4, 3, 1, 1)


def _keep_of(conv: nn.Conv2d, k: int) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).sum(1).argsort(descending=True)[:k].sort().values


def _keep_of_sum(block: nn.Module, k: int) -> torch.Tensor:
    l1 = block.body[6].weight.detach().abs().flatten(1).sum(1)
    l1 = l1 + block.shortcut[0].weight.detach().abs().flatten(1).sum(1)
    return l1.argsort(descending=True)[:k].sort().values


def test_resnet12_ranks_block_outputs_by_conv3_plus_shortcut():
    torch.manual_seed(0)
    teacher = ResNet12(in_channels=1, widths=(4, 4, 4, 4), image_size=16)
    student = ResNet12(in_channels=1, widths=(2, 2, 2, 2), image_size=16)
    block = teacher.features[0]
    # Filter L1 norms: conv3 (4 in-channels x 3x3 = 36 weights per filter) 36 * [10, 0, 1, 0] =
    # [360, 0, 36, 0] would keep {0, 2}; the 1x1 shortcut (1 weight per filter) [0, 324, 0, 36]
    # would keep {1, 3}; their sum [360, 324, 36, 36] keeps {0, 1}.
    _scale_filters(block.body[6], [10.0, 0.0, 1.0, 0.0])
    with torch.no_grad():
        block.shortcut[0].weight.copy_(torch.tensor([0.0, 324.0, 0.0, 36.0]).view(4, 1, 1, 1))
    _scale_filters(block.body[0], [1.0, 2.0, 3.0, 4.0])  # conv1 is ranked on its own: {2, 3}
    state, t = slice_state(teacher, student), teacher.state_dict()
    out, keep1, keep2 = torch.tensor([0, 1]), torch.tensor([2, 3]), _keep_of(block.body[3], 2)
    p = "features.0."
    assert torch.equal(state[p + "body.0.weight"], t[p + "body.0.weight"][keep1])
    assert torch.equal(state[p + "body.1.weight"], t[p + "body.1.weight"][keep1])
    assert torch.equal(state[p + "body.3.weight"], t[p + "body.3.weight"][keep2][:, keep1])
    assert torch.equal(state[p + "body.6.weight"], t[p + "body.6.weight"][out][:, keep2])
    assert torch.equal(state[p + "body.7.bias"], t[p + "body.7.bias"][out])
    assert torch.equal(state[p + "shortcut.0.weight"], t[p + "shortcut.0.weight"][out])
    assert torch.equal(state[p + "shortcut.1.weight"], t[p + "shortcut.1.weight"][out])
    # The next block's conv1 and shortcut read exactly the kept channels {0, 1}.
    nxt, q = teacher.features[1], "features.1."
    assert torch.equal(
        state[q + "body.0.weight"], t[q + "body.0.weight"][_keep_of(nxt.body[0], 2)][:, out]
    )
    assert torch.equal(
        state[q + "shortcut.0.weight"], t[q + "shortcut.0.weight"][_keep_of_sum(nxt, 2)][:, out]
    )


def test_sliced_state_is_a_valid_anchor():
    teacher = Classifier(Conv4(hidden=8), ways=5)
    student = Classifier(Conv4(hidden=4), ways=5)
    theta_star = slice_state(teacher, student)
    student.load_state_dict(theta_star)
    assert parameter_anchor_loss(dict(student.named_parameters()), theta_star).item() == 0.0
    with torch.no_grad():
        student.head.bias += 1.0
    assert parameter_anchor_loss(dict(student.named_parameters()), theta_star).item() == (
        pytest.approx(5.0)
    )


@pytest.mark.parametrize(
    ("teacher", "student", "match"),
    [
        (
            Conv4(hidden=8),
            ResNet12(in_channels=1, widths=RESNET_WIDTHS, image_size=16),
            "same family",
        ),
        (Conv4(hidden=4), Conv4(hidden=8), r"features\.0\.0 has 8 output channels .* only 4"),
        (
            ResNet12(in_channels=1, widths=(4, 4, 4, 4), image_size=16),
            ResNet12(in_channels=1, widths=(2, 2, 2, 8), image_size=16),
            r"features\.3\.body\.0 has 8 output channels",
        ),
        (Conv4(hidden=8), Classifier(Conv4(hidden=4), ways=5), "Classifier"),
        (Classifier(Conv4(hidden=8), ways=5), Classifier(Conv4(hidden=4), ways=3), "ways=5"),
        (Conv4(hidden=8, in_channels=3), Conv4(hidden=4, in_channels=1), "in_channels=3"),
        (
            Classifier(Conv4(hidden=8, image_size=84), ways=5),
            Classifier(Conv4(hidden=4, image_size=28), ways=5),
            "image_size",
        ),
        (VisionTransformer(depth=1), VisionTransformer(depth=1, width=0.5), "Conv4 or ResNet12"),
    ],
    ids=["family", "wider", "wider-block", "wrapping", "ways", "in-channels", "image-size", "vit"],
)
def test_incompatible_architectures_raise(teacher, student, match):
    with pytest.raises(ValueError, match=match):
        slice_state(teacher, student)


def test_different_depth_raises():
    teacher, student = Conv4(hidden=8), Conv4(hidden=4)
    student.features = student.features[:3]
    with pytest.raises(ValueError, match="depths differ"):
        slice_state(teacher, student)

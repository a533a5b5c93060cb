"""θ* transfer by channel slicing (every selection rule, every family, across algorithms), and taps
by module path (forward hooks, vmap-safe)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_metakd.algorithms import MAML, ProtoNet
from lightning_metakd.data import Episode
from lightning_metakd.distill import parameter_anchor_loss, slice_state
from lightning_metakd.distill.transfer import MeanActivation, RandomChannels, TaylorImportance
from lightning_metakd.distill.transfer.structure import structure
from lightning_metakd.models import Conv4, ResNet12, VisionTransformer
from lightning_metakd.models.classifier import Classifier

RESNET_WIDTHS = (4, 6, 8, 10)


def _assert_same_state(state: dict, reference: dict) -> None:
    assert list(state) == list(reference)
    for name, value in reference.items():
        assert torch.equal(state[name], value), name


def _episodes(side: int, ways: int = 3, tasks: int = 2, count: int = 2, seed: int = 0) -> list:
    """``count`` random episodes of ``tasks`` ``ways``-way 2-shot tasks, 2 queries per class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(ways).repeat(2).expand(tasks, -1)
    classes = torch.arange(ways).expand(tasks, -1)

    def images() -> torch.Tensor:
        return torch.randn(tasks, 2 * ways, 1, side, side, generator=g)

    return [Episode(images(), y, images(), y, classes) for _ in range(count)]


def _rules(model: nn.Module, side: int) -> dict:
    """Every rule, the data-driven ones with tiny data fitting ``model`` (``side`` px images)."""
    wrapped = isinstance(model, Classifier)
    algorithm = MAML(inner_lr=0.1) if wrapped else ProtoNet()
    episodes = _episodes(side, ways=model.ways if wrapped else 3)
    return {
        "l1": "l1",
        "bn_gamma": "bn_gamma",
        "random": "random",
        "random-7": RandomChannels(seed=7),
        "activation": MeanActivation([e.support_x[0] for e in episodes]),
        "taylor": TaylorImportance(episodes, algorithm),
    }


# ---------------------------------------------------------------------------------------------
# full width: the "slice" is the teacher, under every rule

SMALL_VIT = dict(image_size=8, patch_size=4, embed_dim=8, depth=2, heads=2)
BUILDS = {
    "conv4": (lambda: Conv4(hidden=8, image_size=28), 28),
    "classifier-conv4": (lambda: Classifier(Conv4(hidden=8, image_size=32), ways=3), 32),
    "resnet12": (lambda: ResNet12(in_channels=1, widths=RESNET_WIDTHS, image_size=16), 16),
    "classifier-resnet12": (
        lambda: Classifier(ResNet12(in_channels=1, widths=RESNET_WIDTHS, image_size=16), ways=3),
        16,
    ),
    "vit": (lambda: VisionTransformer(**SMALL_VIT), 8),
    "classifier-vit": (lambda: Classifier(VisionTransformer(**SMALL_VIT), ways=3), 8),
}
RULE_NAMES = ["l1", "bn_gamma", "random", "random-7", "activation", "taylor"]


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("family", list(BUILDS))
def test_full_width_slice_reproduces_teacher(family, rule):
    build, side = BUILDS[family]
    torch.manual_seed(0)
    teacher, student = build(), build()
    state = slice_state(teacher, student, _rules(teacher, side)[rule])
    _assert_same_state(state, teacher.state_dict())
    student.load_state_dict(state)
    x = torch.randn(4, 1, side, side)
    assert torch.equal(student(x), teacher(x))
    assert all(state[n].data_ptr() != p.data_ptr() for n, p in teacher.named_parameters())


def test_default_rule_is_bn_gamma():
    torch.manual_seed(0)
    teacher, student = Conv4(hidden=8), Conv4(hidden=3)
    with torch.no_grad():
        for block in teacher.features:
            block[1].weight.normal_()
    _assert_same_state(slice_state(teacher, student), slice_state(teacher, student, "bn_gamma"))


# ---------------------------------------------------------------------------------------------
# which channels each rule keeps


def _scale_filters(conv: nn.Conv2d, scales: list[float]) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.ones_like(conv.weight) * torch.tensor(scales).view(-1, 1, 1, 1))


def _set(module: nn.Module, values: list[float]) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.tensor(values))


def _keep_of(conv: nn.Conv2d, k: int) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).sum(1).argsort(descending=True)[:k].sort().values


def _keep_of_sum(block: nn.Module, k: int) -> torch.Tensor:
    l1 = block.body[6].weight.detach().abs().flatten(1).sum(1)
    l1 = l1 + block.shortcut[0].weight.detach().abs().flatten(1).sum(1)
    return l1.argsort(descending=True)[:k].sort().values


def _gamma_keep(bn: nn.Module, k: int) -> torch.Tensor:
    return bn.weight.detach().abs().argsort(descending=True)[:k].sort().values


def test_conv4_bn_gamma_keeps_largest_gamma_channels():
    torch.manual_seed(0)
    teacher = Classifier(Conv4(hidden=8, image_size=32), ways=3)
    student = Classifier(Conv4(hidden=4, image_size=32), ways=3)
    blocks = teacher.backbone.features
    # Block 0: |γ| = 0.1, 3, 2, 0.5, 0.2, 1, 4, 0.3 (signs do not matter) → keep 1, 2, 5, 6. The
    # filters' L1 norms point the other way (largest for channels 0, 3, 4, 7): they are ignored.
    _set(blocks[0][1], [0.1, -3.0, 2.0, 0.5, -0.2, 1.0, 4.0, 0.3])
    _scale_filters(blocks[0][0], [9, 1, 1, 9, 9, 1, 1, 9])
    _set(blocks[3][1], [1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0])  # → keep 0, 2, 4, 6
    with torch.no_grad():
        for i in (1, 2):
            blocks[i][1].weight.normal_()
    state, t = slice_state(teacher, student, "bn_gamma"), teacher.state_dict()
    keep0, keep3 = torch.tensor([1, 2, 5, 6]), torch.tensor([0, 2, 4, 6])
    p = "backbone.features."
    for name in ("0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"):
        assert torch.equal(state[p + name], t[p + name][keep0]), name
    keep1 = _gamma_keep(blocks[1][1], 4)
    assert torch.equal(state[p + "1.0.weight"], t[p + "1.0.weight"][keep1][:, keep0])
    assert torch.equal(state[p + "3.1.weight"], t[p + "3.1.weight"][keep3])
    # Head: 32 px → 2x2 maps, so channel c owns embedding features 4c .. 4c+3.
    columns = (keep3[:, None] * 4 + torch.arange(4)).flatten()
    assert torch.equal(state["head.weight"], t["head.weight"][:, columns])
    assert torch.equal(state["head.bias"], t["head.bias"])
    student.load_state_dict(state)


def test_resnet12_bn_gamma_ranks_block_outputs_by_both_batchnorms():
    teacher = ResNet12(in_channels=1, widths=(4, 4, 4, 4), image_size=16)
    student = ResNet12(in_channels=1, widths=(2, 2, 2, 2), image_size=16)
    block = teacher.features[0]
    # conv3's BN alone would keep {0, 2}, the shortcut's alone {1, 3}; |γ| summed
    # [3, 2.5, 1, 1.5] keeps {0, 1}. The inner BNs are ranked on their own.
    _set(block.body[7], [3.0, 0.0, 1.0, 0.0])
    _set(block.shortcut[1], [0.0, -2.5, 0.0, 1.5])
    _set(block.body[1], [1.0, 2.0, 3.0, 4.0])
    _set(block.body[4], [4.0, -3.0, 2.0, 1.0])
    state, t = slice_state(teacher, student, "bn_gamma"), teacher.state_dict()
    out, keep1, keep2 = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0, 1])
    p = "features.0."
    assert torch.equal(state[p + "body.0.weight"], t[p + "body.0.weight"][keep1])
    assert torch.equal(state[p + "body.3.weight"], t[p + "body.3.weight"][keep2][:, keep1])
    assert torch.equal(state[p + "body.6.weight"], t[p + "body.6.weight"][out][:, keep2])
    for name in ("body.7.weight", "body.7.bias", "shortcut.1.weight", "shortcut.1.bias"):
        assert torch.equal(state[p + name], t[p + name][out]), name
    assert torch.equal(state[p + "shortcut.0.weight"], t[p + "shortcut.0.weight"][out])
    nxt = teacher.features[1]
    keep = _gamma_keep(nxt.body[1], 2)
    assert torch.equal(
        state["features.1.body.0.weight"], t["features.1.body.0.weight"][keep][:, out]
    )


def test_conv4_l1_keeps_largest_l1_filters():
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
    state = slice_state(teacher, student, "l1")
    t = teacher.state_dict()
    keep0 = torch.tensor([1, 3, 5, 7])
    for name in ("0.0.weight", "0.0.bias", "0.1.weight"):
        name = "backbone.features." + name
        assert torch.equal(state[name], t[name][keep0]), name
    keep1 = _keep_of(conv1, 4)
    assert {0, 6} <= set(keep1.tolist())
    assert torch.equal(
        state["backbone.features.1.0.weight"],
        t["backbone.features.1.0.weight"][keep1][:, keep0],
    )
    keep3 = _keep_of(teacher.backbone.features[3][0], 4)
    columns = (keep3[:, None] * 4 + torch.arange(4)).flatten()
    assert torch.equal(state["head.weight"], t["head.weight"][:, columns])
    student.load_state_dict(state)


def test_resnet12_l1_ranks_block_outputs_by_conv3_plus_shortcut():
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
    state, t = slice_state(teacher, student, "l1"), teacher.state_dict()
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


def test_random_selection_is_seeded():
    teacher, student = Conv4(hidden=16), Conv4(hidden=4)
    first = slice_state(teacher, student, RandomChannels(seed=3))
    _assert_same_state(slice_state(teacher, student, RandomChannels(seed=3)), first)
    _assert_same_state(
        slice_state(teacher, student, "random"), slice_state(teacher, student, RandomChannels(0))
    )
    other = slice_state(teacher, student, RandomChannels(seed=4))
    assert any(not torch.equal(first[n], other[n]) for n in first)


def _deaden(convs_and_bns: list[tuple[nn.Conv2d, nn.Module]], keep: int) -> None:
    """Make every channel >= keep of each (conv, bn) pair small in L1 and exactly zero after BN."""
    with torch.no_grad():
        for conv, bn in convs_and_bns:
            conv.weight[keep:] *= 0.01
            bn.weight[keep:] = 0.0
            bn.bias[keep:] = 0.0


@pytest.mark.parametrize("rule", ["l1", "bn_gamma", "activation", "taylor"])
def test_conv4_student_reproduces_teacher_with_dead_channels(rule):
    # Channels the teacher never uses (BatchNorm γ = β = 0, small filters) are exactly the ones
    # every meaningful rule drops, so the narrower student computes the teacher's function.
    torch.manual_seed(1)
    teacher = Classifier(Conv4(hidden=8, image_size=32), ways=5)
    student = Classifier(Conv4(hidden=3, image_size=32), ways=5)
    _deaden([(block[0], block[1]) for block in teacher.backbone.features], keep=3)
    student.load_state_dict(slice_state(teacher, student, _rules(teacher, 32)[rule]))
    x = torch.randn(6, 1, 32, 32)
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["l1", "bn_gamma", "activation", "taylor"])
def test_resnet12_student_reproduces_teacher_with_dead_channels(rule):
    torch.manual_seed(2)
    teacher = Classifier(ResNet12(in_channels=1, widths=(6, 8, 10, 12), image_size=16), ways=3)
    student = Classifier(ResNet12(in_channels=1, widths=(3, 4, 5, 6), image_size=16), ways=3)
    for t_block, s_block in zip(teacher.backbone.features, student.backbone.features, strict=True):
        k = s_block.body[0].out_channels
        pairs = [(t_block.body[i], t_block.body[i + 1]) for i in (0, 3, 6)]
        _deaden([*pairs, (t_block.shortcut[0], t_block.shortcut[1])], keep=k)
    state = slice_state(teacher, student, _rules(teacher, 16)[rule])
    student.load_state_dict(state)
    x = torch.randn(5, 1, 16, 16)
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-6)
    assert state["backbone.features.1.shortcut.0.weight"].shape == (4, 3, 1, 1)


# ---------------------------------------------------------------------------------------------
# the data-driven scores are what they claim to be


def _protonet_loss(model: nn.Module, episode: Episode) -> torch.Tensor:
    logits = ProtoNet().episode_logits(model, dict(model.named_parameters()), episode.support_x,
                                       episode.support_y, episode.query_x, episode.ways,
                                       training=True, vmap_tasks=False)  # fmt: skip
    return F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())


@pytest.mark.parametrize("family", ["conv4", "resnet12"])
def test_taylor_score_is_the_squared_derivative_of_a_channel_mask(family):
    # Σ w·∂L/∂w over the BatchNorm(s) writing a channel is ∂L/∂m for a mask m on the channel;
    # check it against central differences of the loss with γ, β of those BatchNorms scaled by m.
    torch.manual_seed(0)
    if family == "conv4":
        teacher, side = Conv4(hidden=6, image_size=16).double(), 16
        path, bns = "features.1.0", lambda c: [teacher.features[1][1]]
    else:
        teacher = ResNet12(in_channels=1, widths=(4, 4, 4, 4), image_size=16).double()
        path, side = "features.0.body.6", 16
        bns = lambda c: [teacher.features[0].body[7], teacher.features[0].shortcut[1]]  # noqa: E731
    episode = _episodes(side, count=1)[0]
    episode = Episode(episode.support_x.double(), episode.support_y, episode.query_x.double(),
                      episode.query_y, episode.classes)  # fmt: skip
    sets = structure(teacher, teacher, "").sets
    index = [s.name for s in sets].index(path)
    scores = TaylorImportance([episode], ProtoNet()).scores(teacher, sets)[index]
    eps = 1e-6
    for c in range(sets[index].size):
        losses = []
        for m in (1 + eps, 1 - eps):
            with torch.no_grad():
                saved = [(bn.weight[c].clone(), bn.bias[c].clone()) for bn in bns(c)]
                for bn in bns(c):
                    bn.weight[c] *= m
                    bn.bias[c] *= m
                losses.append(_protonet_loss(teacher, episode).item())
                for bn, (w, b) in zip(bns(c), saved, strict=True):
                    bn.weight[c], bn.bias[c] = w, b
        derivative = (losses[0] - losses[1]) / (2 * eps)
        assert scores[c].item() == pytest.approx(derivative**2, rel=1e-4, abs=1e-12)


def test_activation_score_is_the_mean_magnitude_after_relu():
    torch.manual_seed(0)
    teacher = Conv4(hidden=6, image_size=16)
    with torch.no_grad():
        teacher.features[0][1].bias[2] = -50.0  # ReLU cuts channel 2 everywhere: score 0
    batches = [torch.randn(5, 1, 16, 16), torch.randn(7, 1, 16, 16)]
    sets = structure(teacher, teacher, "").sets
    scores = MeanActivation(batches).scores(teacher, sets)
    block0 = teacher.features[0][:3]
    expected = torch.stack([block0(x).abs().mean((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(scores[0].float(), expected)
    assert scores[0][2] == 0
    state = slice_state(teacher, Conv4(hidden=5, image_size=16), MeanActivation(batches))
    assert torch.equal(state["features.0.1.bias"], teacher.features[0][1].bias[[0, 1, 3, 4, 5]])


def test_data_driven_scores_ignore_dropout_and_keep_the_teachers_mode():
    torch.manual_seed(0)
    teacher = ResNet12(in_channels=1, widths=(4, 4, 4, 4), image_size=16, dropout=0.5).train()
    student = ResNet12(in_channels=1, widths=(2, 2, 2, 2), image_size=16)
    rules = _rules(teacher, 16)
    for name in ("activation", "taylor"):
        _assert_same_state(
            slice_state(teacher, student, rules[name]), slice_state(teacher, student, rules[name])
        )
    assert teacher.training


# ---------------------------------------------------------------------------------------------
# the ViT: heads kept whole, residual channels by LayerNorm |γ|, fewer blocks


def _vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{**dict(image_size=8, patch_size=4, mlp_ratio=2.0), **kwargs})


def test_vit_slices_heads_channels_mlp_and_blocks():
    torch.manual_seed(0)
    teacher = _vit(embed_dim=12, heads=3, depth=4)  # head_dim 4, MLP 24
    student = _vit(embed_dim=8, heads=2, depth=2, mlp_ratio=1.5)  # MLP 12
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
        teacher.norm.weight.copy_(torch.tensor([5.0, 0, 0, 4, 0, 0, 3, 0, 2, 1, 1, 1]) + 0.5)
        for part in range(3):  # the q, k and v rows of head 1 (of 0, 1, 2) in block 1
            teacher.blocks[1].attention.qkv.weight[part * 12 + 4 : part * 12 + 8] = 0.0
        teacher.blocks[3].mlp[0].weight[:12] = 0.0  # MLP units 0-11 of block 3: no L1 norm
    state = slice_state(teacher, student, "bn_gamma")
    student.load_state_dict(state)
    assert student(torch.randn(2, 1, 8, 8)).shape == (2, 8)
    t = teacher.state_dict()
    # Residual channels: |γ| summed over every LayerNorm on the stream; only the final norm differs:
    # 5.5, 4.5, 3.5, 2.5 and three 1.5 at 0, 3, 6, 8, 9-11, then the first of the 0.5 ties (1).
    emb = torch.tensor([0, 1, 3, 6, 8, 9, 10, 11])
    assert torch.equal(state["norm.weight"], t["norm.weight"][emb])
    assert torch.equal(state["pos_embed"], t["pos_embed"][..., emb])
    assert torch.equal(state["patch_embed.weight"], t["patch_embed.weight"][emb])
    # default_layer_map(2, 4) = [1, 3]: student block 0 is teacher block 1.
    heads = torch.tensor([0, 2])  # head 1 has the smallest q/k/v rows
    rows = torch.cat([part * 12 + h * 4 + torch.arange(4) for part in range(3) for h in heads])
    assert torch.equal(
        state["blocks.0.attention.qkv.weight"], t["blocks.1.attention.qkv.weight"][rows][:, emb]
    )
    cols = torch.cat([h * 4 + torch.arange(4) for h in heads])
    assert torch.equal(
        state["blocks.0.attention.proj.weight"],
        t["blocks.1.attention.proj.weight"][emb][:, cols],
    )
    assert torch.equal(state["blocks.1.norm2.bias"], t["blocks.3.norm2.bias"][emb])
    # MLP units have no normalisation of their own: ranked by their first-layer rows' L1 norm.
    assert torch.equal(state["blocks.1.mlp.0.bias"], t["blocks.3.mlp.0.bias"][12:])
    first = slice_state(teacher, student, "bn_gamma", blocks=[0, 1])
    assert torch.equal(first["blocks.1.mlp.2.bias"], t["blocks.1.mlp.2.bias"][emb])


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_vit_student_loads_under_every_rule(rule):
    torch.manual_seed(0)
    teacher = Classifier(_vit(embed_dim=12, heads=3, depth=3), ways=3)
    student = Classifier(_vit(embed_dim=8, heads=2, depth=2), ways=3)
    state = slice_state(teacher, student, _rules(teacher, 8)[rule])
    assert list(state) == list(student.state_dict())
    student.load_state_dict(state)


@pytest.mark.parametrize(
    ("student", "blocks", "match"),
    [
        (dict(embed_dim=8, heads=4), None, r"head_dim is 2 but the teacher's is 4.*heads=2"),
        (dict(embed_dim=6, heads=2), None, r"embed_dim=8"),
        (dict(embed_dim=12, heads=3, depth=5), None, "at most as deep"),
        (dict(embed_dim=8, heads=2, depth=2), [2, 1], "increasing teacher block indices"),
        (dict(embed_dim=8, heads=2, depth=2), [0, 4], r"in 0\.\.3"),
        (dict(embed_dim=8, heads=2, patch_size=2), None, "patch_size=4"),
        (dict(embed_dim=16, heads=4), None, "has 16 channels but the teacher's has only 12"),
    ],
    ids=["head-dim", "head-dim-embed", "deeper", "order", "range", "patch", "wider"],
)
def test_vit_incompatible_students_raise(student, blocks, match):
    teacher = _vit(embed_dim=12, heads=3, depth=4)
    with pytest.raises(ValueError, match=match):
        slice_state(teacher, _vit(**{"depth": 4, **student}), blocks=blocks)


# ---------------------------------------------------------------------------------------------
# across algorithms: a ProtoNet body for a MAML student, and back


@pytest.mark.parametrize("rule", ["bn_gamma", "taylor"])
def test_protonet_teacher_gives_a_maml_student_its_body_and_keeps_its_head(rule):
    torch.manual_seed(0)
    teacher = Conv4(hidden=8, image_size=28)  # ProtoNet: the bare backbone
    student = Classifier(Conv4(hidden=4, image_size=28), ways=5)  # MAML/ANIL: a fresh head
    initial = {n: v.clone() for n, v in student.state_dict().items()}
    state = slice_state(teacher, student, _rules(teacher, 28)[rule])
    assert list(state) == list(student.state_dict())
    for name in ("head.weight", "head.bias"):
        assert torch.equal(state[name], initial[name])
        assert state[name].data_ptr() != student.state_dict()[name].data_ptr()
    body = slice_state(teacher, student.backbone, _rules(teacher, 28)[rule])
    for name, value in body.items():
        assert torch.equal(state["backbone." + name], value), name
    student.load_state_dict(state)
    full = slice_state(teacher, Classifier(Conv4(hidden=8, image_size=28), ways=5))
    for name, value in teacher.state_dict().items():
        assert torch.equal(full["backbone." + name], value)


def test_maml_teacher_gives_a_protonet_student_its_body():
    torch.manual_seed(0)
    teacher = Classifier(ResNet12(in_channels=1, widths=RESNET_WIDTHS, image_size=16), ways=5)
    student = ResNet12(in_channels=1, widths=(2, 3, 4, 5), image_size=16)
    state = slice_state(teacher, student)
    assert list(state) == list(student.state_dict())
    wrapped = slice_state(teacher, Classifier(ResNet12(in_channels=1, widths=(2, 3, 4, 5),
                                                       image_size=16), ways=5))  # fmt: skip
    for name, value in state.items():
        assert torch.equal(value, wrapped["backbone." + name]), name
    rule = TaylorImportance(_episodes(16, ways=5), MAML(inner_lr=0.1))
    student.load_state_dict(slice_state(teacher, student, rule))
    same = ResNet12(in_channels=1, widths=RESNET_WIDTHS, image_size=16)
    _assert_same_state(slice_state(teacher, same), teacher.backbone.state_dict())


def test_taylor_needs_the_teachers_algorithm():
    rule = TaylorImportance(_episodes(28), ProtoNet())
    with pytest.raises(
        ValueError, match="ProtoNet runs a bare backbone but the teacher is a Classifier"
    ):
        slice_state(Classifier(Conv4(hidden=8), ways=3), Conv4(hidden=4), rule)
    with pytest.raises(ValueError, match="non-empty list of Episode"):
        TaylorImportance([], ProtoNet())
    with pytest.raises(ValueError, match=r"one tensor \[B, C, H, W\]"):
        MeanActivation(torch.zeros(3, 28, 28))


# ---------------------------------------------------------------------------------------------
# anchors and errors


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
    ("selection", "match"),
    [
        ("gamma", r"unknown selection 'gamma'; use one of \['bn_gamma', 'l1', 'random'\]"),
        ("taylor", r"needs data: pass selection=TaylorImportance\(episodes, algorithm\)"),
        ("activation", r"needs data: pass selection=MeanActivation\(images\)"),
    ],
)
def test_unknown_or_dataless_rule_raises(selection, match):
    with pytest.raises(ValueError, match=match):
        slice_state(Conv4(hidden=8), Conv4(hidden=4), selection)


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
        (Classifier(Conv4(hidden=8), ways=5), Classifier(Conv4(hidden=4), ways=3), "ways=5"),
        (Conv4(hidden=8, in_channels=3), Conv4(hidden=4, in_channels=1), "in_channels=3"),
        (
            Classifier(Conv4(hidden=8, image_size=84), ways=5),
            Classifier(Conv4(hidden=4, image_size=28), ways=5),
            "image_size",
        ),
        (VisionTransformer(depth=1), VisionTransformer(depth=1, width=0.5), "heads=2"),
    ],
    ids=["family", "wider", "wider-block", "ways", "in-channels", "image-size", "vit-width"],
)
def test_incompatible_architectures_raise(teacher, student, match):
    with pytest.raises(ValueError, match=match):
        slice_state(teacher, student)


def test_different_depth_raises():
    teacher, student = Conv4(hidden=8), Conv4(hidden=4)
    student.features = student.features[:3]
    with pytest.raises(ValueError, match="depths differ"):
        slice_state(teacher, student)

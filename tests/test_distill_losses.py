"""Distillation losses: hand-computed values, zero at equality, gradients, shapes, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from lightning_metakd.distill import (
    AttentionDistillation,
    AttentionTransfer,
    HintProjector,
    SoftLabels,
    attention_map_loss,
    attention_transfer_loss,
    default_layer_map,
    feature_loss,
    maml_anchored_distillation_loss,
    parameter_anchor_loss,
    soft_label_loss,
)
from lightning_metakd.models import VisionTransformer

# ---------------------------------------------------------------------------------------------
# soft labels


def test_soft_label_loss_hand_value():
    # Student logits [0, 0] → p_s = [1/2, 1/2] at any T. Teacher logits [2 ln 3, 0] at T = 2 →
    # [ln 3, 0] → p_t = [3/4, 1/4]. KL(p_t ‖ p_s) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2)
    # = 3/4 ln 1.5 − 1/4 ln 2. The loss multiplies by T² = 4. Sample 2 has student == teacher
    # (KL 0), so the mean over the two samples halves it.
    kl = 0.75 * math.log(1.5) - 0.25 * math.log(2.0)
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, -1.0]])
    assert soft_label_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl / 2, rel=1e-6)
    assert soft_label_loss(student[:1], teacher[:1], 2.0).item() == pytest.approx(4 * kl, rel=1e-6)


def test_soft_label_loss_teacher_probs_and_ensemble():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    probs = torch.softmax(teacher / 3.0, dim=-1)
    by_logits = soft_label_loss(student, teacher, 3.0)
    by_probs = soft_label_loss(student, temperature=3.0, teacher_probs=probs)
    torch.testing.assert_close(by_logits, by_probs)
    # Ensemble: the mean of teacher probabilities [1, 0] and [1/2, 1/2] is [3/4, 1/4]; against a
    # uniform student at T = 1 that is KL = 3/4 ln 1.5 − 1/4 ln 2 (a zero probability adds 0).
    ensemble = torch.stack([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])]).mean(0)
    value = soft_label_loss(torch.zeros(1, 2), temperature=1.0, teacher_probs=ensemble)
    assert value.item() == pytest.approx(0.75 * math.log(1.5) - 0.25 * math.log(2.0), rel=1e-6)


def test_soft_label_loss_leading_dims_zero_and_module():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    flat = soft_label_loss(student.reshape(6, 4), teacher.reshape(6, 4), 2.0)
    torch.testing.assert_close(soft_label_loss(student, teacher, 2.0), flat)
    assert soft_label_loss(teacher, teacher, 2.0).abs().item() < 1e-6


def test_soft_label_gradient_reaches_student_not_teacher():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    soft_label_loss(student, teacher.detach(), 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be a positive"),
        ({"temperature": -1.0}, "temperature must be a positive"),
        ({"weight": -0.1}, "weight must be a non-negative"),
        ({"weight": float("nan")}, "weight must be a non-negative"),
    ],
)
def test_soft_label_term_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftLabels(**kwargs)


def test_soft_label_loss_bad_input():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exactly one teacher target"):
        soft_label_loss(z, z, 1.0, teacher_probs=z)
    with pytest.raises(ValueError, match="exactly one teacher target"):
        soft_label_loss(z, temperature=1.0)
    with pytest.raises(ValueError, match="same shape"):
        soft_label_loss(z, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        soft_label_loss(z, z, 0.0)


# ---------------------------------------------------------------------------------------------
# FitNets feature hints


def test_feature_loss_hand_value_and_zero():
    # Differences 0, 2, 0, 2 → squares 0, 4, 0, 4 → mean 2.
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    assert feature_loss(s, t).item() == 2.0
    assert feature_loss(t, t).item() == 0.0
    with pytest.raises(ValueError, match="HintProjector"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_hint_projector_identity_when_widths_match():
    hint = HintProjector(8, 8)
    assert list(hint.parameters()) == []
    s, t = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(hint(s, t), feature_loss(s, t))
    assert hint(t, t).item() == 0.0


def test_hint_projector_conv_projector_hand_value():
    # 1x1 conv 1 → 2 channels with weights [1, 2] and biases [0, 1]: a student map of ones
    # becomes channel 0 = 1, channel 1 = 3. Against a zero teacher: mean of (1², 3²) = 5.
    hint = HintProjector(1, 2, kind="map")
    with torch.no_grad():
        hint.projector.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        hint.projector.bias.copy_(torch.tensor([0.0, 1.0]))
    assert hint(torch.ones(3, 1, 2, 2), torch.zeros(3, 2, 2, 2)).item() == pytest.approx(5.0)
    # A 2x2 student map is resized bilinearly to the teacher's 4x4: constant maps stay constant.
    assert hint(torch.ones(3, 1, 2, 2), torch.zeros(3, 2, 4, 4)).item() == pytest.approx(5.0)
    teacher = hint.project(torch.ones(3, 1, 4, 4))
    assert hint(torch.ones(3, 1, 2, 2), teacher).item() == pytest.approx(0.0, abs=1e-12)


def test_hint_projector_linear_projector_and_gradients():
    torch.manual_seed(0)
    hint = HintProjector(4, 6, kind="vector")
    assert isinstance(hint.projector, torch.nn.Linear)
    params = list(hint.parameters())
    assert len(params) == 2 and all(p.requires_grad for p in params)
    student = torch.randn(5, 4, requires_grad=True)
    teacher_net = torch.nn.Linear(3, 6).requires_grad_(False)
    teacher = teacher_net(torch.randn(5, 3))
    loss = hint(student, teacher)
    expected = ((student @ hint.projector.weight.T + hint.projector.bias - teacher) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in teacher_net.parameters())
    # [B, T, D] token sequences project along the last dimension too.
    assert hint.project(torch.randn(2, 7, 4)).shape == (2, 7, 6)


def test_hint_projector_map_gradients_reach_projector():
    hint = HintProjector(4, 8)
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    teacher = torch.randn(2, 8, 6, 6, requires_grad=True)
    hint(student, teacher.detach()).backward()
    assert student.grad.abs().sum() > 0
    assert hint.projector.weight.grad.abs().sum() > 0 and hint.projector.bias.grad is not None
    assert teacher.grad is None


def test_hint_projector_bad_input():
    with pytest.raises(ValueError, match="student_dim and teacher_dim"):
        HintProjector(0, 4)
    with pytest.raises(ValueError, match="kind must be"):
        HintProjector(2, 4, kind="tokens")
    with pytest.raises(ValueError, match="kind='vector'"):
        HintProjector(2, 4)(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="kind='map'"):
        HintProjector(2, 4, kind="vector")(torch.zeros(3, 2, 5, 5), torch.zeros(3, 4, 5, 5))


# ---------------------------------------------------------------------------------------------
# attention transfer (Zagoruyko & Komodakis 2017)


def test_attention_transfer_hand_value():
    # Student: 2 channels over 2 positions, [1, 0] and [0, 1] → Q = Σ_c A_c² = [1, 1] → [1, 1]/√2.
    # Teacher: 3 channels, [-1, 0], [0, 0], [0, 0] → Q = [1, 0] (|A| ignores the sign).
    # ‖Q_s − Q_t‖² = (1/√2 − 1)² + (1/√2)² = 2 − √2. Sample 2 equal → mean (2 − √2)/2.
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 0.0]], [[0.0, 0.0]]]])
    teacher = torch.zeros(2, 3, 1, 2)
    teacher[:, 0, 0, 0] = -1.0
    assert student.shape == (2, 2, 1, 2)
    value = attention_transfer_loss(student, teacher)
    assert value.item() == pytest.approx((2 - math.sqrt(2)) / 2, rel=1e-6)
    # p = 1 gives the same Q for these 0/±1 maps; a list of two layers sums them.
    assert attention_transfer_loss(student, teacher, p=1).item() == pytest.approx(value.item())
    layers = attention_transfer_loss([student, student], [teacher, teacher])
    assert layers.item() == pytest.approx(2 * value.item())


def test_attention_transfer_zero_resize_and_gradients():
    torch.manual_seed(0)
    teacher = torch.randn(3, 8, 4, 4)
    assert attention_transfer_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-12)
    # Constant maps of different spatial sizes give uniform attention: zero after resizing.
    assert attention_transfer_loss(torch.ones(2, 2, 2, 2), torch.ones(2, 5, 4, 4)).item() == (
        pytest.approx(0.0, abs=1e-12)
    )
    student = torch.randn(3, 2, 2, 2, requires_grad=True)
    teacher = teacher.requires_grad_()
    attention_transfer_loss(student, teacher.detach()).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_attention_transfer_bad_input():
    a = torch.ones(2, 3, 4, 4)
    with pytest.raises(ValueError, match="p must be a positive"):
        attention_transfer_loss(a, a, p=0)
    with pytest.raises(ValueError, match="p must be a positive"):
        AttentionTransfer(p=-1)
    with pytest.raises(ValueError, match="one student map per teacher map"):
        attention_transfer_loss([a, a], [a])
    with pytest.raises(ValueError, match="same batch"):
        attention_transfer_loss(a, torch.ones(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        attention_transfer_loss(torch.ones(2, 16), torch.ones(2, 16))


# ---------------------------------------------------------------------------------------------
# attention-map distillation: L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²

IDENTITY = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
SWAP = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
HALF = torch.full((2, 2), 0.5)


def test_attention_map_loss_hand_values():
    # One layer, B = 1, one head, T = 2: identity vs all-1/2 → four entries ±1/2 → ‖·‖_F² = 1.
    s, t = IDENTITY.view(1, 1, 2, 2), HALF.view(1, 1, 2, 2)
    assert attention_map_loss([s], [t]).item() == pytest.approx(1.0)
    # Σ over two layers → 2; a batch whose second sample matches → mean over B = 1/2.
    assert attention_map_loss([s, s], [t, t]).item() == pytest.approx(2.0)
    batch_s = torch.stack([IDENTITY, HALF]).unsqueeze(1)
    batch_t = torch.stack([HALF, HALF]).unsqueeze(1)
    assert attention_map_loss([batch_s], [batch_t]).item() == pytest.approx(0.5)


def test_attention_map_loss_heads():
    # Equal head counts compare per head: heads (I, I) vs (I, swap) → 0 + 4 × 1² = 4.
    s = torch.stack([IDENTITY, IDENTITY]).unsqueeze(0)
    t = torch.stack([IDENTITY, SWAP]).unsqueeze(0)
    assert attention_map_loss([s], [t]).item() == pytest.approx(4.0)
    # One student head vs two teacher heads: the teacher's mean (I + swap)/2 is all 1/2 → 1.
    assert attention_map_loss([s[:, :1]], [t]).item() == pytest.approx(1.0)


def test_attention_map_loss_kl_hand_value():
    # Rows: teacher [1/2, 1/2], student [3/4, 1/4]: KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    # for both rows (the second student row is [1/4, 3/4]); the mean over rows is the same.
    s = torch.tensor([[0.75, 0.25], [0.25, 0.75]]).view(1, 1, 2, 2)
    t = HALF.view(1, 1, 2, 2)
    kl = attention_map_loss([s], [t], kind="kl")
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert attention_map_loss([t], [t], kind="kl").item() == pytest.approx(0.0, abs=1e-7)


def test_attention_distillation_formula():
    # L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²: uniform logits over 2 classes give
    # L_task = ln 2; with the identity-vs-half maps above (1 per layer, 2 layers) and λ = 0.25
    # the total is ln 2 + 0.5.
    task = F.cross_entropy(torch.zeros(3, 2), torch.tensor([0, 1, 0]))
    s, t = IDENTITY.view(1, 1, 2, 2), HALF.view(1, 1, 2, 2)
    total = task + 0.25 * attention_map_loss([s, s], [t, t])
    assert total.item() == pytest.approx(math.log(2) + 0.5, rel=1e-6)


def test_default_layer_map():
    assert default_layer_map(2, 4) == [1, 3]
    assert default_layer_map(4, 6) == [1, 2, 4, 5]  # 1.5, 3, 4.5, 6 rounded half up, minus 1
    assert default_layer_map(3, 3) == [0, 1, 2]
    assert default_layer_map(3, 1) == [0, 0, 0]
    assert default_layer_map(1, 5) == [4]


@pytest.fixture(scope="module")
def vit_attentions():
    torch.manual_seed(0)
    teacher = VisionTransformer(image_size=8, patch_size=4, embed_dim=16, depth=4, heads=4)
    student = VisionTransformer(image_size=8, patch_size=4, embed_dim=8, depth=2, heads=2)
    teacher.requires_grad_(False)
    x = torch.randn(3, 1, 8, 8)
    _, a_meta = teacher(x, return_attention=True)
    _, a_target = student(x, return_attention=True)
    return student, teacher, a_target, a_meta


def test_attention_map_loss_real_vit_depth_and_heads(vit_attentions):
    student, teacher, a_target, a_meta = vit_attentions
    assert [a.shape for a in a_target] == [(3, 2, 5, 5)] * 2
    assert [a.shape for a in a_meta] == [(3, 4, 5, 5)] * 4
    # Default mapping [1, 3]; heads differ (2 vs 4), so both are averaged to one map.
    expected = sum(
        (a_target[i].mean(1) - a_meta[j].mean(1)).pow(2).sum((-2, -1)).mean()
        for i, j in enumerate([1, 3])
    )
    torch.testing.assert_close(attention_map_loss(a_target, a_meta), expected)
    explicit = sum(
        (a_target[i].mean(1) - a_meta[j].mean(1)).pow(2).sum((-2, -1)).mean()
        for i, j in enumerate([0, 0])
    )
    torch.testing.assert_close(attention_map_loss(a_target, a_meta, layer_map=[0, 0]), explicit)
    assert attention_map_loss(a_meta, a_meta).item() == 0.0
    assert attention_map_loss(a_meta, a_meta, kind="kl").item() == pytest.approx(0.0, abs=1e-6)


def test_attention_map_loss_gradients_reach_student_only(vit_attentions):
    student, teacher, a_target, a_meta = vit_attentions
    student.zero_grad()
    loss = attention_map_loss(a_target, a_meta, kind="frobenius")
    loss.backward(retain_graph=True)
    grads = [p.grad for n, p in student.named_parameters() if n.startswith("blocks.")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad()
    attention_map_loss(a_target, a_meta, kind="kl").backward()
    assert student.blocks[0].attention.qkv.weight.grad.abs().sum() > 0


def test_attention_map_loss_bad_input(vit_attentions):
    _, _, a_target, a_meta = vit_attentions
    with pytest.raises(ValueError, match="layer_map has 1 entries"):
        attention_map_loss(a_target, a_meta, layer_map=[0])
    with pytest.raises(ValueError, match=r"integers in \[0, 4\)"):
        attention_map_loss(a_target, a_meta, layer_map=[0, 4])
    with pytest.raises(ValueError, match="invalid"):
        attention_map_loss(a_target, a_meta, layer_map=[0, 1.5])
    with pytest.raises(ValueError, match="token counts differ"):
        attention_map_loss([torch.ones(3, 2, 5, 5)], [torch.ones(3, 2, 6, 6)])
    with pytest.raises(ValueError, match="batch sizes differ"):
        attention_map_loss([torch.ones(3, 2, 5, 5)], [torch.ones(2, 2, 5, 5)])
    with pytest.raises(ValueError, match="kind must be"):
        attention_map_loss(a_target, a_meta, kind="mse")
    with pytest.raises(ValueError, match="kind must be"):
        AttentionDistillation(kind="l1")
    with pytest.raises(ValueError, match="weight must be a non-negative"):
        AttentionDistillation(weight=-2.0)
    with pytest.raises(ValueError, match="empty"):
        attention_map_loss([], a_meta)


# ---------------------------------------------------------------------------------------------
# MAML-anchored distillation: L = L_task(θ − α∇θ L'_task(θ)) + λ‖θ − θ*‖²


def test_parameter_anchor_loss_hand_value():
    # (1−0)² + (2−0)² + (3−1)² = 1 + 4 + 4 = 9; "extra" is not anchored.
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]]), "extra": torch.ones(4)}
    theta_star = {"a": torch.zeros(2), "b": torch.tensor([[1.0]])}
    assert parameter_anchor_loss(params, theta_star).item() == 9.0
    assert parameter_anchor_loss(theta_star, theta_star).item() == 0.0


def test_parameter_anchor_errors_name_the_parameters():
    theta_star = {"backbone.w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"backbone\.w.*slice_state"):
        parameter_anchor_loss({"w": torch.zeros(2, 3)}, theta_star)
    with pytest.raises(
        ValueError, match=r"backbone\.w: \(2, 4\) vs theta_star \(2, 3\).*slice_state"
    ):
        parameter_anchor_loss({"backbone.w": torch.zeros(2, 4)}, theta_star)
    with pytest.raises(ValueError, match="empty"):
        parameter_anchor_loss({"w": torch.zeros(1)}, {})


def test_maml_anchored_distillation_hand_value_and_second_order_gradient():
    # f_θ(x) = θ x, L'_task(θ) = (θ x_s − y_s)² on the support (x_s = 1, y_s = 0), α = 1/4:
    #   θ' = θ − α · 2 x_s (θ x_s − y_s) = θ − θ/2 = θ/2;  at θ = 1: θ' = 1/2.
    # Query (x_q = 2, y_q = 0): L_task(θ') = (θ' · 2)² = θ² = 1.
    # Anchor θ* = 1/2, λ = 2: λ‖θ − θ*‖² = 2 · 1/4 = 1/2.  L = 1.5.
    # dL/dθ = d(θ²)/dθ + 2λ(θ − θ*) = 2 + 2 = 4 (the 2 needs the second-order path through θ').
    net = torch.nn.Linear(1, 1, bias=False)
    theta = {"weight": torch.ones(1, 1, requires_grad=True)}
    theta_star = {"weight": torch.full((1, 1), 0.5)}
    x_s, y_s, x_q, y_q, alpha = (
        torch.ones(1, 1),
        torch.zeros(1, 1),
        torch.full((1, 1), 2.0),
        0,
        0.25,
    )

    def support_loss(p):
        return (functional_call(net, p, (x_s,)) - y_s).pow(2).sum()

    g = grad(support_loss)(theta)
    adapted = {n: theta[n] - alpha * g[n] for n in theta}
    assert adapted["weight"].item() == pytest.approx(0.5)
    query_loss = (functional_call(net, adapted, (x_q,)) - y_q).pow(2).sum()
    loss = maml_anchored_distillation_loss(query_loss, theta, theta_star, weight=2.0)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert theta["weight"].grad.item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="weight must be a non-negative"):
        maml_anchored_distillation_loss(query_loss, theta, theta_star, weight=-1.0)


def test_losses_run_under_vmap():
    # Per-task losses under torch.func.vmap equal the per-task loop.
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    maps_s, maps_t = torch.randn(3, 2, 4, 3, 3), torch.randn(3, 2, 8, 3, 3)
    att_s = torch.softmax(torch.randn(3, 2, 2, 5, 5), -1)
    att_t = torch.softmax(torch.randn(3, 2, 4, 5, 5), -1)

    def per_task(s, t, ms, mt, a_s, a_t):
        return torch.stack(
            [
                soft_label_loss(s, t, 2.0),
                attention_transfer_loss(ms, mt),
                attention_map_loss([a_s], [a_t]),
                attention_map_loss([a_s], [a_t], kind="kl"),
                parameter_anchor_loss({"w": s}, {"w": t}),
            ]
        )

    batched = torch.func.vmap(per_task)(s, t, maps_s, maps_t, att_s, att_t)
    looped = torch.stack(
        [per_task(*args) for args in zip(s, t, maps_s, maps_t, att_s, att_t, strict=True)]
    )
    torch.testing.assert_close(batched, looped)

"""Taps: forward hooks by module path (the one tap mechanism) and the backbones' tap points."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from lightning_metakd.distill import (
    HintProjector,
    module_paths,
    slice_state,
    tap,
    tap_points,
    tapped_call,
)
from lightning_metakd.models import Conv4, ResNet12, VisionTransformer
from lightning_metakd.models.classifier import Classifier

RESNET_WIDTHS = (4, 6, 8, 10)


def test_module_paths_and_tap_points():
    conv4 = Conv4(hidden=4)
    assert module_paths(conv4, kinds=(nn.Conv2d,)) == [f"features.{i}.0" for i in range(4)]
    assert "features.0.1" in module_paths(conv4)  # BatchNorm is a default kind
    resnet = ResNet12(in_channels=1, widths=RESNET_WIDTHS, image_size=16)
    vit = VisionTransformer(image_size=8, patch_size=4, embed_dim=8, depth=2, heads=2)
    assert tap_points(conv4, "features") == ["features.3"]
    assert tap_points(conv4, "blocks") == [f"features.{i}" for i in range(4)]
    assert tap_points(resnet, "features") == ["features.3"]
    assert tap_points(vit, "features") == ["norm"]
    assert tap_points(vit, "attention") == ["blocks.0.attention.probabilities",
                                            "blocks.1.attention.probabilities"]  # fmt: skip
    assert tap_points(Classifier(resnet, ways=3), "features") == ["backbone.features.3"]
    with pytest.raises(ValueError, match=r"needs the 'attention' tap points.*Conv4 states only"):
        tap_points(conv4, "attention", "AttentionDistillation")
    with pytest.raises(ValueError, match=r"Sequential states none.*module_paths"):
        tap_points(nn.Sequential(nn.Linear(2, 2)), "features")
    shapes = {
        "conv4": (conv4, torch.randn(2, 1, 28, 28), (2, 4, 1, 1)),
        "resnet": (resnet, torch.randn(2, 1, 16, 16), (2, 10, 1, 1)),
        "vit": (vit, torch.randn(2, 1, 8, 8), (2, 5, 8)),
    }
    for model, x, shape in shapes.values():
        (path,) = tap_points(model, "features")
        _, taps = tapped_call(model, dict(model.named_parameters()), x, path)
        assert taps[path].shape == shape


def test_tapped_call_matches_forward_and_removes_hooks():
    torch.manual_seed(0)
    net = Classifier(Conv4(hidden=4), ways=3)
    x = torch.randn(3, 1, 28, 28)
    params = {n: p * 1.5 for n, p in net.named_parameters()}
    out, taps = tapped_call(net, params, x, ["backbone.features.3", "backbone", "head"])
    torch.testing.assert_close(out, functional_call(net, params, (x,)))
    torch.testing.assert_close(out, taps["head"])
    backbone_params = {n.removeprefix("backbone."): p for n, p in params.items() if "head" not in n}
    feat = functional_call(net.backbone, backbone_params, (x,))
    torch.testing.assert_close(taps["backbone"], feat)
    torch.testing.assert_close(taps["backbone.features.3"].flatten(1), feat)
    assert all(not m._forward_hooks for m in net.modules())
    # Hooks are removed even when the forward pass fails.
    with pytest.raises(RuntimeError):  # a 3-d input breaks the first conv
        tapped_call(net, None, torch.randn(3, 1, 28), ["backbone.features.0"])
    assert all(not m._forward_hooks for m in net.modules())


def test_tapped_call_gradients_and_vit_attention():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=8, patch_size=4, embed_dim=8, depth=2, heads=2)
    x = torch.randn(2, 1, 8, 8)
    paths = ["blocks.1.attention", "blocks.1.attention.probabilities"]
    (embedding, attentions), taps = tapped_call(vit, None, x, paths, return_attention=True)
    out = taps["blocks.1.attention"]  # a module returning (out, attention) reports out
    torch.testing.assert_close(taps["blocks.1.attention.probabilities"], attentions[1])
    out.pow(2).sum().backward()
    assert vit.blocks[1].attention.qkv.weight.grad.abs().sum() > 0
    assert vit.blocks[1].mlp[0].weight.grad is None  # after the tap: not on the loss's path


def test_tapped_call_under_vmap_equals_loop():
    # Per-task parameters (as after an inner loop) and per-task images: vmap and a loop agree,
    # and the tapped tensors come out of the vmapped function as return values.
    torch.manual_seed(0)
    net = Conv4(hidden=4)
    base = dict(net.named_parameters())
    tasks = 3
    params = {n: torch.stack([p + 0.1 * i for i in range(tasks)]) for n, p in base.items()}
    x = torch.randn(tasks, 5, 1, 28, 28)
    paths = ["features.1", "features.3"]

    def one_task(p, xs):
        out, taps = tapped_call(net, p, xs, paths)
        return out, taps

    out_v, taps_v = vmap(one_task)(params, x)
    for i in range(tasks):
        out_i, taps_i = one_task({n: p[i] for n, p in params.items()}, x[i])
        torch.testing.assert_close(out_v[i], out_i)
        for path in paths:
            torch.testing.assert_close(taps_v[path][i], taps_i[path])
    assert taps_v["features.1"].shape == (tasks, 5, 4, 7, 7)
    assert all(not m._forward_hooks for m in net.modules())


def test_tapped_call_bad_paths():
    net = Conv4(hidden=4)
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"no submodule 'features\.9'.*features\.0"):
        tapped_call(net, None, x, "features.9")
    with pytest.raises(ValueError, match=r"Did you mean \['features\.3\.\d'"):
        tapped_call(net, None, x, "features.3.O")

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"\['spare'\] did not run"):
        tapped_call(Unused(), None, torch.randn(1, 2), ["used", "spare"])


def test_taps_feed_feature_distillation_from_a_sliced_student():
    # The whole FitNets path: a student sliced from θ*, both networks tapped at their default
    # path, a learned 1x1 projector from 4 to 8 channels; gradients reach the student and the
    # projector, never the frozen teacher.
    torch.manual_seed(0)
    teacher = Classifier(Conv4(hidden=8), ways=3).requires_grad_(False)
    student = Classifier(Conv4(hidden=4), ways=3)
    student.load_state_dict(slice_state(teacher, student))
    hint = HintProjector(student_dim=4, teacher_dim=8)
    x = torch.randn(6, 1, 28, 28)
    (path,) = tap_points(student, "features")
    _, t_taps = tapped_call(teacher, None, x, path)
    _, s_taps = tapped_call(student, dict(student.named_parameters()), x, path)
    loss = hint(s_taps[path], t_taps[path])
    assert loss.item() > 0
    loss.backward()
    assert student.backbone.features[0][0].weight.grad.abs().sum() > 0
    assert student.head.weight.grad is None  # the head is after the tap
    assert hint.projector.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_tap_captures_inputs_with_pre_hooks():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    x = torch.randn(4, 2)
    with tap(net, ["2"], inputs=True) as seen:
        net(x)
    torch.testing.assert_close(seen["2"], net[1](net[0](x)))
    assert all(not m._forward_pre_hooks for m in net.modules())

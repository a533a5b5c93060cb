"""Backbones: shapes, width multipliers, attention maps, and safety under torch.func transforms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_metakd.models import Conv4, ResNet12, VisionTransformer

TASKS, BATCH = 3, 6


def small_model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Narrow versions of each backbone on 1x28x28 images, fast enough for transform tests."""
    torch.manual_seed(0)
    if name == "conv4":
        model = Conv4(in_channels=1, hidden=8, image_size=28)
    elif name == "resnet12":
        model = ResNet12(in_channels=1, widths=(8, 12, 16, 20), image_size=28)
    elif name == "vit":
        model = VisionTransformer(image_size=28, patch_size=7, embed_dim=16, depth=2, heads=2)
    else:
        raise KeyError(name)
    return model.to(dtype)


MODELS = ["conv4", "resnet12", "vit"]


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def perturbed(params: dict[str, Tensor], seed: int, scale: float = 0.05) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in params.items()}


def call(model: nn.Module, params: dict[str, Tensor], x: Tensor, attention: bool = False):
    kwargs = {"return_attention": True} if attention else {}
    return functional_call(model, params, (x,), kwargs)


def tasks_of_images(
    tasks: int = TASKS, batch: int = BATCH, seed: int = 1, dtype: torch.dtype = torch.float32
) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tasks, batch, 1, 28, 28, generator=g).to(dtype)


def conv_param_count(model: nn.Module) -> int:
    return sum(
        p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()
    )


# --- shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "size", "side"), [(1, 28, 1), (3, 84, 5)], ids=["28px", "84px"]
)
def test_resnet12_default_shapes(channels: int, size: int, side: int) -> None:
    net = ResNet12(in_channels=channels, image_size=size)
    x = torch.randn(2, channels, size, size)
    assert net.channels == (64, 160, 320, 640)
    assert net.num_features == 640
    assert net(x).shape == (2, 640)
    assert net.forward_features(x).shape == (2, 640, side, side)
    # MetaOptNet's ResNet-12 has about 12.4M parameters.
    assert 12.3e6 < sum(p.numel() for p in net.parameters()) < 12.5e6


def test_resnet12_without_the_last_pool_averages_the_whole_last_map() -> None:
    torch.manual_seed(0)
    pooled = ResNet12(in_channels=1, image_size=28, width=0.25)
    torch.manual_seed(0)
    whole = ResNet12(in_channels=1, image_size=28, width=0.25, pool_last_block=False)
    whole.load_state_dict(pooled.state_dict())  # same parameters: only the pooling differs
    x = torch.randn(2, 1, 28, 28)
    last_map = whole.forward_features(x)
    assert last_map.shape == (2, 160, 3, 3)
    torch.testing.assert_close(whole(x), last_map.mean((2, 3)))
    # Floor max-pooling of the 3x3 map keeps only its top-left 2x2 window.
    torch.testing.assert_close(pooled(x), last_map[..., :2, :2].amax((2, 3)))
    assert [isinstance(b.pool, torch.nn.MaxPool2d) for b in whole.features] == [1, 1, 1, 0]


@pytest.mark.parametrize(
    ("channels", "size", "patch"), [(1, 28, 4), (3, 84, 12)], ids=["28px", "84px"]
)
def test_vit_shapes(channels: int, size: int, patch: int) -> None:
    vit = VisionTransformer(image_size=size, patch_size=patch, in_channels=channels)
    x = torch.randn(2, channels, size, size)
    assert vit.num_tokens == 50 and vit.num_features == 64
    assert vit(x).shape == (2, 64)
    assert vit.forward_features(x).shape == (2, 50, 64)
    torch.testing.assert_close(vit.forward_features(x)[:, 0], vit(x))
    embedding, attentions = vit(x, return_attention=True)
    torch.testing.assert_close(embedding, vit(x))
    assert len(attentions) == 4
    for attention in attentions:
        assert attention.shape == (2, 4, 50, 50)


def test_conv4_shapes_for_reference() -> None:
    assert Conv4(1, 64, image_size=28)(torch.randn(2, 1, 28, 28)).shape == (2, 64)
    assert Conv4(3, 32, image_size=84)(torch.randn(2, 3, 84, 84)).shape == (2, 32 * 25)


def test_conv4_channels_last_is_the_same_function_and_survives_copies_and_loading() -> None:
    torch.manual_seed(0)
    fast, plain = Conv4(1, 16), Conv4(1, 16, channels_last=False)
    plain.load_state_dict(fast.state_dict())
    weight = "features.1.0.weight"  # (the first has one input channel: both layouts at once)
    assert fast.get_parameter(weight).is_contiguous(memory_format=torch.channels_last)
    assert not fast.get_parameter(weight).is_contiguous()
    assert plain.get_parameter(weight).is_contiguous()
    x = torch.randn(40, 1, 28, 28)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-4)
    # the layout stays through a copy, loading NCHW weights and a gradient step
    again = copy.deepcopy(fast)
    again.load_state_dict(plain.state_dict())
    assert again.get_parameter(weight).is_contiguous(memory_format=torch.channels_last)
    again(x).sum().backward()
    grad_ = again.get_parameter(weight).grad
    assert grad_ is not None and grad_.is_contiguous(memory_format=torch.channels_last)


# --- width multiplier ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet12_width_scales_conv_params_quadratically(channels: int) -> None:
    full, half = ResNet12(in_channels=channels), ResNet12(in_channels=channels, width=0.5)
    assert half.channels == (32, 80, 160, 320) and half.num_features == 320
    ratio = conv_param_count(half) / conv_param_count(full)
    # Every conv except the first (fixed input channels) shrinks by exactly 1/4.
    assert ratio == pytest.approx(0.25, abs=1e-3)
    assert ratio > 0.25


def test_resnet12_width_rounds_and_custom_widths() -> None:
    net = ResNet12(in_channels=1, widths=(10, 20, 30, 40), width=0.25, image_size=28)
    assert net.channels == (2, 5, 8, 10)  # round(2.5) == 2, round(7.5) == 8 (banker's rounding)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_vit_width_scales_blocks_and_keeps_heads_integer() -> None:
    full, half = VisionTransformer(), VisionTransformer(width=0.5)
    assert half.num_features == 32
    full_count = sum(p.numel() for p in full.blocks.parameters())
    half_count = sum(p.numel() for p in half.blocks.parameters())
    assert half_count / full_count == pytest.approx(0.25, abs=0.01)
    odd = VisionTransformer(embed_dim=64, heads=4, width=0.3)  # 19.2 → 20, divisible by 4
    assert odd.num_features == 20 and odd.num_features % odd.heads == 0
    assert odd(torch.randn(1, 1, 28, 28)).shape == (1, 20)
    tiny = VisionTransformer(embed_dim=8, heads=4, width=0.01)
    assert tiny.num_features == 4


# --- attention ----------------------------------------------------------------------------------


def test_vit_attention_rows_are_distributions() -> None:
    vit = small_model("vit")
    _, attentions = vit(torch.randn(4, 1, 28, 28), return_attention=True)
    assert len(attentions) == vit.depth == 2
    for attention in attentions:
        assert attention.shape == (4, 2, 17, 17)
        assert (attention >= 0).all()
        torch.testing.assert_close(attention.sum(-1), torch.ones(4, 2, 17))


def test_vit_class_token_attention_depends_on_input() -> None:
    vit = VisionTransformer()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    _, attentions = vit(x, return_attention=True)
    first_rows = attentions[0][:, :, 0]  # [B, heads, tokens]
    assert (first_rows[0] - first_rows[1]).abs().max() > 1e-3
    # The same image twice gives the same row: the difference above comes from the input.
    _, same = vit(x[:1].expand(2, -1, -1, -1), return_attention=True)
    torch.testing.assert_close(same[0][0, :, 0], same[0][1, :, 0])


def test_vit_is_independent_of_the_rest_of_the_batch() -> None:
    vit = small_model("vit")
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(vit(x)[:2], vit(x[:2]))


# --- input checking -----------------------------------------------------------------------------


def test_bad_inputs_and_arguments_fail_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="resize the images"):
        VisionTransformer()(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="in_channels"):
        ResNet12(in_channels=3, widths=(4, 4, 4, 4))(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="at least 16"):
        ResNet12(in_channels=1, widths=(4, 4, 4, 4), image_size=28)(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="four positive block widths"):
        ResNet12(widths=(64, 160, 320))
    with pytest.raises(ValueError, match="image_size >= 16"):
        ResNet12(image_size=8)


# --- train/eval: no running statistics ----------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_train_and_eval_modes_agree_and_nothing_is_buffered(name: str) -> None:
    model = small_model(name)
    assert list(model.buffers()) == []
    x = torch.randn(BATCH, 1, 28, 28)
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)
    torch.testing.assert_close(model.train()(x), train_out, rtol=0, atol=0)


def test_resnet12_dropout_only_acts_in_training() -> None:
    net = ResNet12(in_channels=1, widths=(8, 8, 8, 8), image_size=28, dropout=0.5)
    x = torch.randn(BATCH, 1, 28, 28)
    torch.manual_seed(0)
    assert not torch.allclose(net.train()(x), net.eval()(x))
    torch.testing.assert_close(net.eval()(x), net.eval()(x), rtol=0, atol=0)


# --- torch.func ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_functional_call_equals_module_with_those_weights(name: str) -> None:
    model = small_model(name)
    x = torch.randn(BATCH, 1, 28, 28)
    torch.testing.assert_close(call(model, params_of(model), x), model(x))
    new = perturbed(params_of(model), seed=5)
    loaded = copy.deepcopy(model)
    loaded.load_state_dict(new)
    torch.testing.assert_close(call(model, new, x), loaded(x))
    assert not torch.allclose(call(model, new, x), model(x))


CASES = [("conv4", False), ("resnet12", False), ("vit", False), ("vit", True)]


def _flat(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    embedding, attentions = out
    return [embedding, *attentions]


@pytest.mark.parametrize(("name", "attention"), CASES)
def test_vmap_over_tasks_with_shared_params_equals_loop(name: str, attention: bool) -> None:
    model = small_model(name)
    params, xs = params_of(model), tasks_of_images()
    batched = vmap(lambda p, x: call(model, p, x, attention), in_dims=(None, 0))(params, xs)
    looped = [call(model, params, xs[t], attention) for t in range(TASKS)]
    for i, value in enumerate(_flat(batched)):
        torch.testing.assert_close(value, torch.stack([_flat(out)[i] for out in looped]))


@pytest.mark.parametrize(("name", "attention"), CASES)
def test_vmap_over_tasks_with_per_task_params_equals_loop(name: str, attention: bool) -> None:
    model = small_model(name)
    per_task = [perturbed(params_of(model), seed=t) for t in range(TASKS)]
    stacked = {k: torch.stack([p[k] for p in per_task]) for k in per_task[0]}
    xs = tasks_of_images()
    batched = vmap(lambda p, x: call(model, p, x, attention), in_dims=(0, 0))(stacked, xs)
    looped = [call(model, per_task[t], xs[t], attention) for t in range(TASKS)]
    for i, value in enumerate(_flat(batched)):
        torch.testing.assert_close(value, torch.stack([_flat(out)[i] for out in looped]))


def _loss(model: nn.Module, attention: bool):
    """A scalar loss of a linear read-out (and of the attention maps when returned)."""

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = call(model, params, x, attention)
        embedding = out[0] if attention else out
        logits = embedding[:, :5] * 3.0
        value = F.cross_entropy(logits, y)
        if attention:
            value = value + sum((a[:, :, 0] ** 2).sum() for a in out[1])
        return value

    return loss


@pytest.mark.parametrize(("name", "attention"), CASES)
def test_func_grad_matches_autograd(name: str, attention: bool) -> None:
    # float64: BatchNorm after a 1-channel 1x1 conv has a gradient that is zero up to roundoff.
    model = small_model(name, torch.float64)
    x, y = tasks_of_images(1, dtype=torch.float64)[0], torch.arange(BATCH) % 5
    loss = _loss(model, attention)
    grads = grad(loss)(params_of(model), x, y)

    model.zero_grad()
    loss(dict(model.named_parameters()), x, y).backward()
    assert grads.keys() == dict(model.named_parameters()).keys()
    for key, param in model.named_parameters():
        torch.testing.assert_close(grads[key], param.grad, msg=f"gradient of {key}")
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize(("name", "attention"), CASES)
def test_vmap_of_grad_over_tasks_equals_loop(name: str, attention: bool) -> None:
    """Per-task inner-loop gradients (the MAML pattern) computed batched and one by one."""
    model = small_model(name, torch.float64)
    params, xs = params_of(model), tasks_of_images(dtype=torch.float64)
    ys = torch.arange(BATCH).repeat(TASKS, 1) % 5
    loss = _loss(model, attention)
    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    for t in range(TASKS):
        single = grad(loss)(params, xs[t], ys[t])
        for key in params:
            torch.testing.assert_close(batched[key][t], single[key], msg=f"task {t}, {key}")

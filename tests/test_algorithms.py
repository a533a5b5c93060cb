"""The functional inner loop and the meta-learning algorithms: numbers, paths, errors, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_metakd.algorithms import (
    ANIL,
    MAML,
    MatchingNet,
    MetaAlgorithm,
    MetaSGD,
    ProtoNet,
    class_means,
    composite_normalization,
    inner_loop,
    prepare_model,
)
from lightning_metakd.models import Conv4
from lightning_metakd.models.classifier import Classifier

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 2, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(Conv4(hidden=8, image_size=SIZE), ways=WAYS).double()


def tiny_backbone(seed: int = 0) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(hidden=8, image_size=SIZE).double()


def task_batch(tasks: int = 3, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Random float64 tasks: support_x, support_y, query_x, query_y with a leading task dim."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, WAYS * SHOTS, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, WAYS * QUERIES, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1)
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1)
    return sx, sy, qx, qy


def reference_query_loss(model, params, sx, sy, qx, qy, lr, steps, first_order):
    """MAML written out with torch.autograd.grad(create_graph=True): the textbook reference."""
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, fast, (sx,)), sy)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
        fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads, strict=True)}
    return F.cross_entropy(functional_call(model, fast, (qx,)), qy)


def meta_grads(loss, params):
    return torch.autograd.grad(loss, list(params.values()))


def assert_all_close(a, b, **kw):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **kw)


# ----------------------------------------------------------------------------- inner loop


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
def test_inner_loop_meta_gradient_matches_autograd_reference(steps, first_order):
    model = tiny_classifier()
    params = dict(model.named_parameters())
    sx, sy, qx, qy = (t[0] for t in task_batch(1))
    fast = inner_loop(
        model, params, sx, sy, inner_lr=0.3, inner_steps=steps, first_order=first_order
    )
    ours = meta_grads(F.cross_entropy(functional_call(model, fast, (qx,)), qy), params)
    ref_loss = reference_query_loss(model, params, sx, sy, qx, qy, 0.3, steps, first_order)
    assert_all_close(ours, meta_grads(ref_loss, params), rtol=1e-9, atol=1e-11)


def test_second_order_meta_gradient_differs_from_first_order():
    model = tiny_classifier()
    params = dict(model.named_parameters())
    sx, sy, qx, qy = (t[0] for t in task_batch(1))
    grads = {}
    for first_order in (False, True):
        fast = inner_loop(
            model, params, sx, sy, inner_lr=0.3, inner_steps=2, first_order=first_order
        )
        loss = F.cross_entropy(functional_call(model, fast, (qx,)), qy)
        grads[first_order] = torch.cat([g.flatten() for g in meta_grads(loss, params)])
    difference = (grads[False] - grads[True]).abs().max()
    assert difference > 1e-4 * grads[False].abs().max()


def test_inner_loop_lowers_support_loss_and_zero_steps_is_identity():
    model = tiny_classifier()
    params = dict(model.named_parameters())
    sx, sy, _, _ = (t[0] for t in task_batch(1))
    same = inner_loop(model, params, sx, sy, inner_lr=0.3, inner_steps=0)
    assert list(same) == list(params) and all(same[n] is params[n] for n in params)
    before = F.cross_entropy(functional_call(model, params, (sx,)), sy)
    fast = inner_loop(model, params, sx, sy, inner_lr=0.3, inner_steps=3)
    assert list(fast) == list(params)
    assert F.cross_entropy(functional_call(model, fast, (sx,)), sy) < before


def test_loop_and_vmap_inner_gradients_agree_on_a_parameter_the_loss_never_reaches():
    # The loop takes inner gradients with torch.autograd.grad, vmap with torch.func.grad: an
    # unused parameter must get a zero gradient on both paths (not an error, not None).
    model = tiny_classifier()
    model.register_parameter("unused", nn.Parameter(torch.ones(3)))
    params = dict(model.named_parameters())
    sx, sy, _, _ = task_batch(2)
    loop = [
        inner_loop(model, params, x, y, inner_lr=0.3, inner_steps=2)
        for x, y in zip(sx, sy, strict=True)
    ]
    mapped = torch.func.vmap(
        lambda x, y: inner_loop(model, params, x, y, inner_lr=0.3, inner_steps=2)
    )(sx, sy)
    for t, fast in enumerate(loop):
        torch.testing.assert_close(fast["unused"], params["unused"])
        for name in params:
            torch.testing.assert_close(mapped[name][t], fast[name])


def test_anil_adapts_only_the_head():
    model = tiny_classifier()
    params = dict(model.named_parameters())
    sx, sy, _, _ = (t[0] for t in task_batch(1))
    fast = ANIL(inner_lr=0.5, inner_steps=2).adapt(model, params, sx, sy, WAYS, training=True)
    head = {n for n in params if n.startswith("head.")}
    assert head == {"head.weight", "head.bias"}
    for name in params:
        if name in head:
            assert not torch.equal(fast[name], params[name]), name
        else:
            assert fast[name] is params[name], name


def test_per_parameter_inner_lr_matches_scalar_and_reaches_the_learning_rates():
    model = tiny_classifier()
    params = dict(model.named_parameters())
    sx, sy, qx, qy = (t[0] for t in task_batch(1))
    algo = MetaSGD(inner_lr=0.3, inner_steps=2).double()
    algo.build(model)
    assert len(algo.inner_lrs) == len(params)
    fast = algo.adapt(model, params, sx, sy, WAYS, training=True)
    reference = inner_loop(model, params, sx, sy, inner_lr=0.3, inner_steps=2)
    assert_all_close(list(fast.values()), list(reference.values()), rtol=1e-12, atol=1e-12)
    F.cross_entropy(algo.logits(model, params, fast, qx, WAYS), qy).backward()
    for key, lr in algo.inner_lrs.items():
        assert lr.grad is not None and lr.grad.abs().sum() > 0, key
    assert all(p.grad is not None for p in model.parameters())


def test_first_order_meta_sgd_still_trains_the_learning_rates():
    model = tiny_classifier()
    sx, sy, qx, qy = (t[0] for t in task_batch(1))
    algo = MetaSGD(inner_lr=0.3, first_order=True).double()
    algo.build(model)
    logits = algo.task_logits(model, dict(model.named_parameters()), sx, sy, qx, WAYS, True)
    F.cross_entropy(logits, qy).backward()
    assert all(lr.grad.abs().sum() > 0 for lr in algo.inner_lrs.values())


def test_meta_sgd_learning_rates_are_checkpointed():
    model = tiny_classifier()
    algo = MetaSGD(inner_lr=0.3)
    algo.build(model)
    algo.build(model)  # idempotent
    with torch.no_grad():
        algo.inner_lrs["head__bias"].fill_(0.7)
    state = algo.state_dict()
    assert "inner_lrs.head__bias" in state and "inner_lrs.backbone__features__0__0__weight" in state
    fresh = MetaSGD(inner_lr=0.3)
    fresh.build(model)
    fresh.load_state_dict(state)
    assert torch.all(fresh.step_sizes()["head.bias"] == 0.7)


def test_evaluation_uses_inner_steps_test_without_a_second_order_graph():
    model = tiny_classifier()
    params = dict(model.named_parameters())
    sx, sy, qx, _ = (t[0] for t in task_batch(1))
    algo = MAML(inner_lr=0.3, inner_steps=1, inner_steps_test=3)
    expected = functional_call(
        model, inner_loop(model, params, sx, sy, inner_lr=0.3, inner_steps=3), (qx,)
    )
    torch.testing.assert_close(algo.task_logits(model, params, sx, sy, qx, WAYS, False), expected)
    for context in (torch.no_grad, torch.inference_mode):  # adaptation still runs inside these
        with context():
            logits = algo.task_logits(model, params, sx, sy, qx, WAYS, training=False)
        torch.testing.assert_close(logits, expected.detach())


# ----------------------------------------------------------------------------- vmap vs loop

ALGORITHMS = {
    "maml": lambda: MAML(inner_lr=0.3, inner_steps=2),
    "fomaml": lambda: MAML(inner_lr=0.3, inner_steps=2, first_order=True),
    "anil": lambda: ANIL(inner_lr=0.3, inner_steps=2),
    "metasgd": lambda: MetaSGD(inner_lr=0.3, inner_steps=2),
    "protonet": lambda: ProtoNet(),
    "matchingnet": lambda: MatchingNet(temperature=0.5),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_vmap_over_tasks_equals_the_loop(name, chunk_size):
    algo: MetaAlgorithm = ALGORITHMS[name]().double()
    model = tiny_classifier() if algo.needs_head else tiny_backbone()
    algo.build(model)
    params = dict(model.named_parameters())
    meta = list(params.values()) + list(algo.parameters())
    sx, sy, qx, qy = task_batch(3)
    results = []
    for vmap_tasks in (False, True):
        logits = algo.episode_logits(
            model, params, sx, sy, qx, WAYS, True, vmap_tasks=vmap_tasks, chunk_size=chunk_size
        )
        assert logits.shape == (3, WAYS * QUERIES, WAYS)
        loss = F.cross_entropy(logits.flatten(0, 1), qy.flatten())
        results.append((logits, torch.autograd.grad(loss, meta)))
    (loop_logits, loop_grads), (vmap_logits, vmap_grads) = results
    torch.testing.assert_close(vmap_logits, loop_logits, rtol=1e-9, atol=1e-10)
    assert_all_close(vmap_grads, loop_grads, rtol=1e-8, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in loop_grads)


NORM_MODELS = {
    "layernorm": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(SIZE * SIZE, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, WAYS)
    ),
    "instancenorm": lambda: nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.InstanceNorm2d(2, affine=True),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * SIZE * SIZE, WAYS),
    ),
}


@pytest.mark.parametrize("name", list(NORM_MODELS))
def test_second_order_vmap_through_layer_and_instance_norm_equals_the_loop(name):
    # The fused kernels' double backward is wrong under vmap (torch 2.14); the vmap path must not
    # use them. BatchNorm is covered by the Conv4 cases above.
    torch.manual_seed(0)
    model = NORM_MODELS[name]().double()
    params = dict(model.named_parameters())
    sx, sy, qx, qy = task_batch(3)
    grads = []
    for vmap_tasks in (False, True):
        logits = MAML(inner_lr=0.3).episode_logits(
            model, params, sx, sy, qx, WAYS, True, vmap_tasks=vmap_tasks
        )
        grads.append(meta_grads(F.cross_entropy(logits.flatten(0, 1), qy.flatten()), params))
    assert_all_close(grads[1], grads[0], rtol=1e-8, atol=1e-12)


def test_composite_normalization_gives_the_fused_values():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    lw, lb = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    calls = [
        lambda: F.batch_norm(x, None, None, w, b, training=True, eps=1e-3),
        lambda: F.instance_norm(x, weight=w, bias=b),
        lambda: F.layer_norm(x, [5], lw, lb),
    ]
    for call in calls:
        with composite_normalization():
            composite = call()
        torch.testing.assert_close(composite, call(), rtol=1e-10, atol=1e-10)


def test_episode_logits_picks_the_loop_on_cpu(monkeypatch):
    import lightning_metakd.algorithms.engine as engine

    def no_vmap(*args, **kwargs):
        raise AssertionError("vmap should not be used on CPU by default")

    monkeypatch.setattr(engine, "vmap", no_vmap)
    model = tiny_backbone()
    sx, sy, qx, _ = task_batch(2)
    logits = ProtoNet().episode_logits(
        model, dict(model.named_parameters()), sx, sy, qx, WAYS, True
    )
    assert logits.shape == (2, WAYS * QUERIES, WAYS)


def test_dropout_draws_a_different_mask_per_task_under_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.ones(2, 4, 2, 2)  # two identical tasks of 4 samples with 4 features
    y = torch.tensor([0, 1, 0, 1]).expand(2, 4)
    logits = MAML(inner_lr=0.1).episode_logits(
        model, dict(model.named_parameters()), x, y, x, 2, True, vmap_tasks=True
    )
    assert not torch.allclose(logits[0], logits[1])


# ----------------------------------------------------------------------------- metric methods


class Identity2D(nn.Flatten):
    """An identity 'backbone' on 2-D points, so that logits can be worked out by hand."""

    num_features = 2


def test_protonet_logits_by_hand():
    support_x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    support_y = torch.tensor([0, 0, 1, 1])  # prototypes (1, 0) and (0, 3)
    query_x = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    logits = ProtoNet().task_logits(Identity2D(), {}, support_x, support_y, query_x, 2, True)
    # (1,1): -|(0,1)|^2 = -1, -|(1,-2)|^2 = -5;  (0,3): -|(-1,3)|^2 = -10, 0
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -5.0], [-10.0, 0.0]]))
    cosine = ProtoNet("cosine").task_logits(
        Identity2D(), {}, support_x, support_y, query_x, 2, True
    )
    s = 2**-0.5
    torch.testing.assert_close(cosine, torch.tensor([[s, s], [0.0, 1.0]]))
    protos = class_means(support_x, support_y, 2)
    torch.testing.assert_close(protos, torch.tensor([[1.0, 0.0], [0.0, 3.0]]))


def test_matchingnet_logits_by_hand():
    support_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    support_y = torch.tensor([0, 1, 1])
    query_x = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    algo = MatchingNet(temperature=0.5)
    logits = algo.task_logits(Identity2D(), {}, support_x, support_y, query_x, 2, True)
    # query (3,0): cosines (1, 0, 0) / 0.5 -> weights e^2, 1, 1; class 1 gets two of them
    e2 = torch.exp(torch.tensor(2.0))
    first = torch.stack([e2, torch.tensor(2.0)]) / (e2 + 2)
    # query (1,1): cosines all 1/sqrt(2) -> uniform attention 1/3, 2/3
    second = torch.tensor([1 / 3, 2 / 3])
    torch.testing.assert_close(logits.exp(), torch.stack([first, second]))
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2))


# ----------------------------------------------------------------------------- policy and errors


def test_prepare_model_switches_running_stats_to_batch_statistics():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten())
    model.num_features = 4 * SIZE * SIZE
    with pytest.warns(UserWarning, match="running statistics"):
        prepare_model(model)
    assert not model[1].track_running_stats and model[1].running_mean is None
    sx, sy, qx, _ = (t.float() if t.is_floating_point() else t for t in task_batch(2))
    logits = ProtoNet().episode_logits(
        model, dict(model.named_parameters()), sx, sy, qx, WAYS, True, vmap_tasks=True
    )
    assert logits.shape == (2, WAYS * QUERIES, WAYS)


def test_clear_errors_for_bad_input():
    model = tiny_classifier()
    params = dict(model.named_parameters())
    sx, sy, qx, _ = task_batch(1)
    with pytest.raises(ValueError, match="5 outputs"):
        MAML().task_logits(model, params, sx[0], sy[0], qx[0], ways=5, training=True)
    with pytest.raises(RuntimeError, match="build"):
        MetaSGD().task_logits(model, params, sx[0], sy[0], qx[0], WAYS, True)
    with pytest.raises(ValueError, match="Classifier"):
        ANIL().adapt(
            tiny_backbone(), dict(tiny_backbone().named_parameters()), sx[0], sy[0], 3, True
        )
    with pytest.raises(KeyError, match="not in params"):
        inner_loop(model, params, sx[0], sy[0], inner_lr=0.1, inner_steps=1, adapt=["nope"])
    with pytest.raises(KeyError, match="no learning rate"):
        inner_loop(model, params, sx[0], sy[0], inner_lr={}, inner_steps=1)
    with pytest.raises(ValueError, match="batched tasks"):
        MAML().episode_logits(model, params, sx[0], sy[0], qx[0], WAYS, True)
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(inner_steps=-1)
    with pytest.raises(ValueError, match="distance"):
        ProtoNet("manhattan")


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_a_few_dozen_meta_steps_lift_query_accuracy_above_chance(name):
    from conftest import TinyDataModule

    torch.manual_seed(0)
    dm = TinyDataModule(ways=3, shots=2, queries=3, meta_batch_size=4, image_size=SIZE, seed=0)
    dm.setup()
    backbone = Conv4(hidden=8, image_size=SIZE)
    algo = MAML(inner_lr=0.4, inner_steps=1) if name == "maml" else ProtoNet()
    model = Classifier(backbone, ways=3) if algo.needs_head else backbone
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def accuracy(loader, limit):
        correct = total = 0
        for i, ep in enumerate(loader):
            if i == limit:
                break
            logits = algo.episode_logits(
                model, dict(model.named_parameters()), ep.support_x, ep.support_y, ep.query_x,
                3, training=False,
            )  # fmt: skip
            correct += (logits.argmax(-1) == ep.query_y).sum().item()
            total += ep.query_y.numel()
        return correct / total

    before = accuracy(dm.test_dataloader(), 10)
    steps = 0
    while steps < 40:
        for ep in dm.train_dataloader():
            logits = algo.episode_logits(
                model, dict(model.named_parameters()), ep.support_x, ep.support_y, ep.query_x,
                3, training=True,
            )  # fmt: skip
            loss = F.cross_entropy(logits.flatten(0, 1), ep.query_y.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    after = accuracy(dm.test_dataloader(), 10)
    assert after > 1 / 3 + 0.25, (before, after)

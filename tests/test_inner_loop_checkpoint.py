"""Checkpointing the inner loop: same meta-gradients, fewer saved tensors, clear errors."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_metakd.algorithms import ANIL, MAML, MetaSGD, inner_loop
from lightning_metakd.data import Episode
from lightning_metakd.models import Conv4
from lightning_metakd.models.classifier import Classifier
from lightning_metakd.modules.meta_learner import MetaLearnerModule
from lightning_metakd.spec import component_spec

WAYS, SHOTS, QUERIES, SIZE, TASKS = 3, 2, 2, 16, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(Conv4(hidden=8, image_size=SIZE), ways=WAYS).double()


def episode(tasks: int = TASKS, seed: int = 1) -> Episode:
    """Random float64 tasks (``classes`` is a placeholder: only the learner's checks read it)."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, WAYS * SHOTS, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, WAYS * QUERIES, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1)
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1)
    return Episode(sx, sy, qx, qy, torch.arange(WAYS).expand(tasks, -1))


ALGORITHMS = {
    "maml-2nd-order-3-steps": lambda ck: MAML(inner_lr=0.3, inner_steps=3, checkpoint_steps=ck),
    "fomaml-3-steps": lambda ck: MAML(
        inner_lr=0.3, inner_steps=3, first_order=True, checkpoint_steps=ck
    ),
    "anil-2nd-order-3-steps": lambda ck: ANIL(inner_lr=0.3, inner_steps=3, checkpoint_steps=ck),
    "metasgd-2nd-order-2-steps": lambda ck: MetaSGD(
        inner_lr=0.3, inner_steps=2, checkpoint_steps=ck
    ),
    "metasgd-1st-order-2-steps": lambda ck: MetaSGD(
        inner_lr=0.3, inner_steps=2, first_order=True, checkpoint_steps=ck
    ),
}


def meta_gradients(make_algorithm, checkpoint_steps: bool) -> tuple[Tensor, list[Tensor]]:
    """Outer query loss and its gradients w.r.t. θ (and Meta-SGD's learning rates), float64."""
    model, algorithm = classifier(), make_algorithm(checkpoint_steps).double()
    algorithm.build(model)
    batch = episode()
    params = dict(model.named_parameters())
    logits = algorithm.episode_logits(
        model, params, batch.support_x, batch.support_y, batch.query_x, WAYS, training=True,
        vmap_tasks=False,
    )  # fmt: skip
    loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
    wrt = [*params.values(), *algorithm.parameters()]
    return loss, list(torch.autograd.grad(loss, wrt, allow_unused=True))


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_checkpointed_meta_gradients_equal_the_plain_ones(name):
    plain_loss, plain = meta_gradients(ALGORITHMS[name], checkpoint_steps=False)
    loss, checkpointed = meta_gradients(ALGORITHMS[name], checkpoint_steps=True)
    assert len(plain) == len(checkpointed) > 0
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-12)
    for a, b in zip(checkpointed, plain, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    if name.startswith("metasgd"):  # wrt = θ then one learning rate per θ: those move too
        learning_rates = checkpointed[len(checkpointed) // 2 :]
        assert all(g is not None and g.abs().sum() > 0 for g in learning_rates)


def saved_bytes(output: Tensor) -> tuple[int, set[str]]:
    """Bytes of the distinct storages the autograd graph behind ``output`` keeps for backward.

    Walks every node reachable from ``output.grad_fn`` and reads its saved tensors (the
    ``_saved_*`` attributes of built-in nodes, ``saved_tensors`` of custom Functions).
    ``torch.autograd.graph.saved_tensors_hooks`` cannot count them here: ``torch.func.grad``
    refuses to run while such hooks are installed. Also returns the node type names.
    """
    storages: dict[int, int] = {}
    kinds: set[str] = set()
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        kinds.add(type(node).__name__)
        values = [getattr(node, a, None) for a in dir(node) if a.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):
            values.append(node.saved_tensors)
        for value in values:
            for t in value if isinstance(value, tuple | list) else (value,):
                if isinstance(t, Tensor):
                    storage = t.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values()), kinds


def test_checkpointing_keeps_parameters_not_activations():
    """The control: a no-op ``checkpoint_steps`` would save one step's activations per step."""
    model = classifier()
    params = dict(model.named_parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    batch = episode(tasks=1)
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]

    def graph(steps: int, checkpoint_steps: bool) -> tuple[int, set[str]]:
        fast = inner_loop(
            model, params, sx, sy, inner_lr=0.3, inner_steps=steps,
            checkpoint_steps=checkpoint_steps,
        )  # fmt: skip
        return saved_bytes(functional_call(model, fast, (qx,)).sum())

    plain_growth = graph(4, False)[0] - graph(1, False)[0]
    (checkpointed_4, kinds), (checkpointed_1, _) = graph(4, True), graph(1, True)
    assert "_RecomputedStepBackward" in kinds
    assert "_RecomputedStepBackward" not in graph(4, False)[1]
    # Three more steps keep exactly three more parameter sets (θ_1, θ_2, θ_3) ...
    assert checkpointed_4 - checkpointed_1 == 3 * param_bytes
    # ... where the plain loop keeps three steps' support activations and inner-backward tensors.
    # (Conv4-8, 6 support images of 16x16: 1.8 MB against 46 kB when this was written.)
    assert plain_growth > 10 * 3 * param_bytes


def test_dropout_in_the_support_forward_is_replayed_exactly():
    """The recomputation draws the same dropout masks as the forward (RNG state is restored)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.Dropout(0.5), nn.ReLU(), nn.Linear(12, 3)
    )
    model = model.double()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    sx, qx = (torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.arange(3).repeat(2)
    grads = {}
    for checkpoint_steps in (False, True):
        torch.manual_seed(3)
        fast = inner_loop(
            model, params, sx, y, inner_lr=0.5, inner_steps=3, checkpoint_steps=checkpoint_steps
        )
        loss = F.cross_entropy(functional_call(model, fast, (qx,)), y)
        torch.manual_seed(4)  # the outer backward must not depend on the RNG state it meets
        grads[checkpoint_steps] = torch.autograd.grad(loss, list(params.values()))
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_parameters_left_out_of_params_still_get_their_meta_gradient():
    """``params`` without the backbone: the module's own backbone weights are recomputed inputs."""
    grads = {}
    for checkpoint_steps in (False, True):
        model, batch = classifier(), episode(tasks=1)
        head = {n: p for n, p in model.named_parameters() if n.startswith("head.")}
        fast = inner_loop(
            model, head, batch.support_x[0], batch.support_y[0], inner_lr=0.3, inner_steps=2,
            checkpoint_steps=checkpoint_steps,
        )  # fmt: skip
        logits = functional_call(model, fast, (batch.query_x[0],))
        loss = F.cross_entropy(logits, batch.query_y[0])
        grads[checkpoint_steps] = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("task_chunk_size", [None, TASKS], ids=["one-task-graph", "all-graphs"])
def test_training_step_updates_the_same_parameters(task_chunk_size):
    """The module's real step (autograd.grad per task, or one backward) moves θ the same way."""
    updated, evaluated = {}, {}
    for checkpoint_steps in (False, True):
        torch.manual_seed(0)
        module = MetaLearnerModule(
            Conv4(hidden=8, image_size=SIZE),
            MAML(inner_lr=0.3, inner_steps=3, checkpoint_steps=checkpoint_steps),
            ways=WAYS,
            vmap_tasks=False,
            task_chunk_size=task_chunk_size,
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        ).double()
        optimizer = module.configure_optimizers()
        batch, initial = episode(), [p.detach().clone() for p in module.parameters()]
        with pytest.warns(match="self.log"):  # no Trainer attached: logging is a no-op
            module.training_step(batch, 0).backward()
        optimizer.step()
        updated[checkpoint_steps] = [p.detach().clone() for p in module.parameters()]
        evaluated[checkpoint_steps] = module.learner.evaluate(batch).logits
    moved = max((a - b).abs().max() for a, b in zip(updated[False], initial, strict=True))
    assert moved > 1e-3  # the step did something, so equality below is not vacuous
    for a, b in zip(updated[True], updated[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(evaluated[True], evaluated[False], rtol=0, atol=1e-10)


@pytest.mark.parametrize("algorithm", [MAML, ANIL, MetaSGD])
def test_checkpoint_steps_is_a_config_argument(algorithm):
    spec = component_spec(algorithm(checkpoint_steps=True))
    assert spec["init_args"]["checkpoint_steps"] is True
    assert "checkpoint_steps=True" in repr(algorithm(checkpoint_steps=True))


def test_vmap_with_checkpointing_is_a_clear_error_before_any_step():
    with pytest.raises(ValueError, match="vmap_tasks=False.*task_chunk_size"):
        MetaLearnerModule(
            Conv4(hidden=8, image_size=SIZE), MAML(checkpoint_steps=True), ways=WAYS,
            vmap_tasks=True,
        )  # fmt: skip
    # vmap_tasks=None picks vmap off CPU: the learner's setup refuses on such a device.
    learner = MetaLearnerModule(
        Conv4(hidden=8, image_size=SIZE), MAML(checkpoint_steps=True), ways=WAYS
    )
    learner._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")))
    with pytest.raises(ValueError, match="vmap_tasks=False"):
        learner.setup("fit")
    learner._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    learner.setup("fit")  # the loop: fine
    # Without checkpointing vmap stays allowed.
    MetaLearnerModule(Conv4(hidden=8, image_size=SIZE), MAML(), ways=WAYS, vmap_tasks=True)


def test_vmap_with_checkpointing_is_a_clear_error_in_the_functions_too():
    model, batch = classifier(), episode()
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match="vmap_tasks=False"):
        MAML(checkpoint_steps=True).episode_logits(
            model, params, batch.support_x, batch.support_y, batch.query_x, WAYS, training=True,
            vmap_tasks=True,
        )  # fmt: skip

    def adapt(sx: Tensor, sy: Tensor) -> dict[str, Tensor]:
        return inner_loop(model, params, sx, sy, inner_lr=0.3, inner_steps=1, checkpoint_steps=True)

    with pytest.raises(ValueError, match="torch.func"):
        torch.func.vmap(adapt)(batch.support_x, batch.support_y)

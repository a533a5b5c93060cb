"""Learner: the shared adapt/predict/evaluate of every module, report and deployment; input checks."""

from __future__ import annotations

import pytest
import torch

from lightning_metakd.algorithms import MAML, Learner, MatchingNet, ProtoNet, map_tasks, use_vmap
from lightning_metakd.models import Conv4
from lightning_metakd.spec import build_component


def learner(algorithm=None, ways: int = 3, **backbone) -> Learner:
    torch.manual_seed(0)
    return Learner(
        Conv4(**{"hidden": 4, "image_size": 8, **backbone}), algorithm or ProtoNet(), ways
    )


def support(ways: int = 3, shots: int = 2, channels: int = 1, size: int = 8):
    x = torch.rand(ways * shots, channels, size, size, generator=torch.Generator().manual_seed(0))
    return x, torch.arange(ways).repeat_interleave(shots)


@pytest.mark.parametrize(
    ("make", "bad", "match"),
    [
        (support, lambda x, y: (x, y + 3), r"labels 0..N-1, each at least once; got \[3, 4, 5\]"),
        (support, lambda x, y: (x, y * 2), r"got \[0, 2, 4\].*torch.unique"),
        (support, lambda x, y: (x, y[:-1]), "holds 6 images but support_y 5 labels"),
        (support, lambda x, y: (x, y.float()), "integer labels, got dtype torch.float32"),
        (support, lambda x, y: (x[:, :, :4], y), r"built for 8x8 images but support_x has \(4, 8\)"),
        (support, lambda x, y: (x.expand(-1, 3, -1, -1), y), "expects 1-channel images but support_x has 3"),
        (support, lambda x, y: (x[0], y), r"support_x must be a batch of images \[B, C, H, W\]"),
        (support, lambda x, y: (x, y.view(2, 3)), r"support_y must be a 1-d tensor"),
        (support, lambda x, y: (x[:2], y[:2] * 0), "at least 2 classes"),
    ],
    ids=["out-of-range", "gaps", "lengths", "float", "size", "channels", "one-image", "2-d", "one-class"],
)  # fmt: skip
def test_adapt_checks_its_inputs(make, bad, match):
    x, y = bad(*make())
    with pytest.raises(ValueError, match=match):
        learner().adapt(x, y)


def test_a_head_learner_needs_its_number_of_classes():
    with pytest.raises(ValueError, match="3-way head but the support set has 4 classes"):
        learner(MAML(), ways=3).adapt(*support(ways=4))
    state = learner(ProtoNet(), ways=3).adapt(*support(ways=4))  # a metric learner takes any N
    assert state.state.shape[0] == 4


def test_predict_checks_the_queries():
    model = learner()
    state = model.adapt(*support())
    with pytest.raises(ValueError, match="expects 1-channel images but query_x has 3"):
        model.predict(state, torch.rand(2, 3, 8, 8))
    assert model.predict(state, torch.rand(5, 1, 8, 8)).shape == (5, 3)


@pytest.mark.parametrize("algorithm", [MAML(inner_lr=0.3), ProtoNet(), MatchingNet()],
                         ids=lambda a: type(a).__name__)  # fmt: skip
def test_fold_gives_the_adapted_predictions(algorithm):
    model = learner(algorithm)
    x, y = support()
    queries = torch.rand(7, 1, 8, 8)
    folded = model.fold(x, y)
    with torch.no_grad():
        torch.testing.assert_close(folded(queries), model.predict(model.adapt(x, y), queries))
    assert folded is not model.model


def test_components_rebuild_the_learner():
    model = learner(MAML(inner_lr=0.2, inner_steps=2), ways=4, hidden=6)
    spec = model.components()
    assert spec["ways"] == 4 and spec["backbone"]["init_args"]["hidden"] == 6
    rebuilt = Learner.from_components(spec)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.algorithm.inner_steps == 2
    assert type(build_component(spec["algorithm"])) is MAML


def test_the_episode_engine_loops_on_cpu_and_stacks_nested_outputs():
    assert use_vmap(None, "cpu") is False and use_vmap(None, "cuda") is True
    assert use_vmap(True, "cpu") is True
    x = torch.arange(12.0).reshape(3, 4)
    for vmap_tasks in (False, True):
        out = map_tasks(lambda row: (row.sum(), {"max": row.max()}), (x,), vmap_tasks=vmap_tasks)
        assert torch.equal(out[0], x.sum(1)) and torch.equal(out[1]["max"], x.amax(1))
    with pytest.raises(ValueError, match="checkpoint_steps=True"):
        map_tasks(lambda r: r, (x,), vmap_tasks=True, algorithms=[MAML(checkpoint_steps=True)])

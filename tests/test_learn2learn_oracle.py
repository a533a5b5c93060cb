"""learn2learn as an oracle: our MAML and Meta-SGD meta-gradients equal learn2learn's.

learn2learn is optional (``python scripts/install_learn2learn.py``); these tests skip without it,
unless ``METAKD_REQUIRE_LEARN2LEARN=1`` is set (CI), where its absence is a failure.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from lightning_metakd.algorithms import MAML, MetaSGD
from lightning_metakd.models import Conv4
from lightning_metakd.models.classifier import Classifier

pytestmark = [pytest.mark.learn2learn, pytest.mark.usefixtures("one_thread")]

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 3, 16


def test_learn2learn_is_installed_when_required():
    if os.environ.get("METAKD_REQUIRE_LEARN2LEARN") != "1":
        pytest.skip("set METAKD_REQUIRE_LEARN2LEARN=1 to require learn2learn")
    assert importlib.util.find_spec("learn2learn") is not None, (
        "METAKD_REQUIRE_LEARN2LEARN=1 but learn2learn is not installed; run "
        "`python scripts/install_learn2learn.py`."
    )


@pytest.fixture(scope="module")
def l2l():
    return pytest.importorskip("learn2learn")


@pytest.fixture
def task():
    torch.manual_seed(0)
    model = Classifier(Conv4(hidden=4, image_size=SIZE), ways=WAYS).double()
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(WAYS * SHOTS, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    qx = torch.randn(WAYS * QUERIES, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS)
    qy = torch.arange(WAYS).repeat_interleave(QUERIES)
    return model, sx, sy, qx, qy


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_equals_learn2learn(l2l, task, steps, first_order):
    model, sx, sy, qx, qy = task
    params = dict(model.named_parameters())
    algo = MAML(inner_lr=0.3, inner_steps=steps, first_order=first_order)
    logits = algo.task_logits(model, params, sx, sy, qx, WAYS, training=True)
    ours = torch.autograd.grad(F.cross_entropy(logits, qy), list(params.values()))

    learner = l2l.algorithms.MAML(model, lr=0.3, first_order=first_order).clone()
    for _ in range(steps):
        learner.adapt(F.cross_entropy(learner(sx), sy))
    theirs = torch.autograd.grad(F.cross_entropy(learner(qx), qy), list(params.values()))
    assert_same(ours, theirs)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_sgd_meta_gradient_equals_learn2learn(l2l, task, steps, first_order):
    model, sx, sy, qx, qy = task
    params = dict(model.named_parameters())
    algo = MetaSGD(inner_lr=0.3, inner_steps=steps, first_order=first_order).double()
    algo.build(model)
    # learn2learn keeps one learning rate per model.parameters() entry, in that order; give both
    # the same non-uniform values so that a mix-up of names would show.
    wrapper = l2l.algorithms.MetaSGD(model, lr=0.3, first_order=first_order)
    with torch.no_grad():
        for i, ((name, _), theirs_lr) in enumerate(zip(params.items(), wrapper.lrs, strict=True)):
            ours_lr = algo.inner_lrs[name.replace(".", "__")]
            ours_lr.mul_(1 + 0.1 * i)
            theirs_lr.copy_(ours_lr)
    logits = algo.task_logits(model, params, sx, sy, qx, WAYS, training=True)
    ours_inputs = list(params.values()) + [algo.inner_lrs[n.replace(".", "__")] for n in params]
    ours = torch.autograd.grad(F.cross_entropy(logits, qy), ours_inputs)

    learner = wrapper.clone()
    for _ in range(steps):
        learner.adapt(F.cross_entropy(learner(sx), sy))
    theirs_inputs = list(params.values()) + list(wrapper.lrs)
    theirs = torch.autograd.grad(F.cross_entropy(learner(qx), qy), theirs_inputs)
    assert_same(ours, theirs)

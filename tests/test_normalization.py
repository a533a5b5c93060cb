"""Normalisation policies: a query's answer does not depend on its batch (but under transductive)."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyDataModule

from lightning_metakd.algorithms import MAML, POLICIES, Learner, MatchingNet, ProtoNet
from lightning_metakd.models import Conv4, ResNet12, VisionTransformer
from lightning_metakd.modules import MetaLearnerModule, load_learner

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16
BACKBONES = {
    "Conv4": lambda: Conv4(hidden=4, image_size=SIZE),
    "ResNet12": lambda: ResNet12(in_channels=1, widths=(4, 4, 4, 4), image_size=SIZE),
    "ViT": lambda: VisionTransformer(image_size=SIZE, patch_size=4, embed_dim=8, depth=2, heads=2),
}


def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def learner(backbone: str, algorithm, policy: str) -> Learner:
    torch.manual_seed(0)
    model = Learner(BACKBONES[backbone](), algorithm, ways=3, normalization=policy)
    if policy == "population":
        model.calibrate([images(6, s) for s in range(4)])
    return model


@pytest.mark.parametrize("policy", ["support", "population"])
@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("algorithm", [ProtoNet, lambda: MAML(inner_lr=0.05, inner_steps=2)],
                         ids=["ProtoNet", "MAML"])  # fmt: skip
def test_fifty_queries_one_at_a_time_equal_one_batch(backbone, algorithm, policy):
    model = learner(backbone, algorithm(), policy)
    support_x, support_y = images(6, 10), torch.arange(3).repeat(2)
    queries = images(50, 11)
    task = model.adapt(support_x, support_y)
    together = model.predict(task, queries)
    alone = torch.cat([model.predict(task, q[None]) for q in queries])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
    if backbone != "ViT":  # control: with batch statistics the batch changes every answer
        batch = model.predict(model.adapt(support_x, support_y, "transductive"), queries)
        single = model.predict(model.adapt(support_x, support_y, "transductive"), queries[:1])
        assert (single - batch[:1]).abs().max() > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("algorithm", [ProtoNet, lambda: MAML(inner_lr=0.05, inner_steps=2)],
                         ids=["ProtoNet", "MAML"])  # fmt: skip
def test_loop_and_vmap_agree_under_every_policy(algorithm, policy):
    dm = TinyDataModule(ways=3, shots=2, queries=3, meta_batch_size=3, image_size=SIZE)
    dm.setup()
    episode = next(iter(dm.train_dataloader())).to(dtype=torch.float64)
    outputs = {}
    for vmap in (False, True):
        model = learner("Conv4", algorithm(), policy).double()
        model.vmap_tasks = vmap
        for training in (True, False):
            out = model.episode_loss(episode, training=training)
            if training:
                out.loss.backward()
                grads = [p.grad.clone() for p in model.model.parameters()]
            outputs[vmap, training] = out.logits.detach()
        outputs[vmap, "grads"] = grads
    for key in (True, False):
        torch.testing.assert_close(outputs[True, key], outputs[False, key], rtol=1e-9, atol=1e-10)
    for a, b in zip(outputs[True, "grads"], outputs[False, "grads"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_support_statistics_reach_the_meta_gradient():
    """Training under the support policy normalises queries with the support set's statistics:
    a different (and differentiable) objective from transductive training."""
    dm = TinyDataModule(ways=3, shots=2, queries=3, meta_batch_size=2, image_size=SIZE)
    dm.setup()
    episode = next(iter(dm.train_dataloader()))
    losses = {p: learner("Conv4", ProtoNet(), p).episode_loss(episode).loss for p in POLICIES[:2]}
    assert abs(losses["support"].item() - losses["transductive"].item()) > 1e-4
    losses["support"].backward()


@pytest.mark.parametrize("algorithm", [ProtoNet, MatchingNet, lambda: MAML(inner_lr=0.3)],
                         ids=["ProtoNet", "MatchingNet", "MAML"])  # fmt: skip
def test_a_folded_support_classifier_answers_each_image_alone(algorithm):
    model = learner("Conv4", algorithm(), "transductive")
    support_x, support_y = images(6, 1), torch.arange(3).repeat(2)
    folded = model.fold(support_x, support_y)  # the support policy: BatchNorm statistics fixed
    queries = images(10, 2)
    with torch.no_grad():
        expected = model.predict(model.adapt(support_x, support_y), queries)
        torch.testing.assert_close(folded(queries), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded(queries[3:4]), expected[3:4], rtol=1e-5, atol=1e-5)


def test_the_policy_and_population_statistics_are_checkpointed(tmp_path):
    import lightning as L

    dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=2,
                        val_episodes=2, test_episodes=4, image_size=SIZE)  # fmt: skip
    torch.manual_seed(0)
    module = MetaLearnerModule(Conv4(hidden=4, image_size=SIZE), ProtoNet(), ways=3,
                               normalization="population")  # fmt: skip
    run = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path)  # fmt: skip
    run.fit(module, dm)  # calibrated at validation
    assert bool(module.learner.calibrated)
    path = tmp_path / "population.ckpt"
    run.save_checkpoint(path)
    loaded = load_learner(path)
    assert loaded.normalization == "population" and bool(loaded.calibrated)
    for name, (mean, var) in module.learner.population_statistics().items():
        assert torch.equal(loaded.population_statistics()[name][0], mean), name
        assert torch.equal(loaded.population_statistics()[name][1], var), name
    dm.setup("test")
    episode = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(loaded.evaluate(episode).logits,
                               module.learner.evaluate(episode).logits)  # fmt: skip


def test_policy_errors_name_the_fix():
    with pytest.raises(
        ValueError, match=r"unknown normalization 'batch'; use one of \['transductive'"
    ):
        Learner(Conv4(hidden=4, image_size=SIZE), ProtoNet(), ways=3, normalization="batch")
    model = Learner(
        Conv4(hidden=4, image_size=SIZE), ProtoNet(), ways=3, normalization="population"
    )
    with pytest.raises(RuntimeError, match=r"no population statistics yet: call learner.calibrate"):
        model.adapt(images(3, 0), torch.arange(3))
    with pytest.raises(TypeError, match="predict takes the TaskState that learner.adapt returned"):
        model.predict(torch.zeros(3, 4), images(2, 0))
    with pytest.raises(ValueError, match="calibrate needs at least one batch"):
        model.calibrate([])

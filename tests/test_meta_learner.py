"""MetaLearnerModule: training, evaluation with gradients, checkpoints, adapting in user code."""

from __future__ import annotations

import functools
import gc

import lightning as L
import pytest
import torch
from conftest import TinyDataModule

from lightning_metakd.algorithms import ANIL, MAML, MatchingNet, MetaSGD, ProtoNet
from lightning_metakd.models import Conv4
from lightning_metakd.modules.meta_learner import MetaLearnerModule


def tiny_data(**kwargs) -> TinyDataModule:
    defaults = dict(
        ways=3,
        shots=1,
        queries=3,
        meta_batch_size=4,
        steps_per_epoch=10,
        val_episodes=8,
        test_episodes=12,
        image_size=16,
    )
    defaults.update(kwargs)
    return TinyDataModule(**defaults)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture
def episode16():
    dm = tiny_data()
    dm.setup()
    return next(iter(dm.train_dataloader()))


def learner(algorithm, ways: int = 3) -> MetaLearnerModule:
    torch.manual_seed(0)
    optimizer = functools.partial(torch.optim.Adam, lr=5e-3)
    return MetaLearnerModule(
        Conv4(hidden=8, image_size=16), algorithm, ways=ways, optimizer=optimizer
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm",
    [
        ProtoNet(),
        MatchingNet(),
        MAML(inner_lr=0.5, inner_steps=1),
        ANIL(inner_lr=0.5, inner_steps=2),
        MetaSGD(inner_lr=0.5, inner_steps=1),
    ],
    ids=lambda a: type(a).__name__,
)
def test_fit_learns_and_test_reports_ci(tmp_path, algorithm):
    model, dm = learner(algorithm), tiny_data()
    before = trainer(tmp_path).test(model, dm, verbose=False)[0]["test/acc"]
    t = trainer(tmp_path)
    t.fit(model, dm)
    assert "val/acc" in t.callback_metrics and "val/acc_ci95" in t.callback_metrics
    metrics = t.test(model, dm, verbose=False)[0]
    assert set(metrics) >= {"test/acc", "test/acc_ci95", "test/loss"}
    assert metrics["test/acc"] > max(before, 1 / 3) + 0.15
    assert 0 < metrics["test/acc_ci95"] < 0.3


def test_ci95_matches_the_per_episode_accuracies(tmp_path):
    model, dm = learner(ProtoNet()), tiny_data()
    metrics = trainer(tmp_path).test(model, dm, verbose=False)[0]
    dm.setup()
    accs = torch.cat(
        [model.episode_loss(ep, training=False).accuracy for ep in dm.test_dataloader()]
    )
    assert len(accs) == 12
    assert metrics["test/acc"] == pytest.approx(accs.mean().item(), abs=1e-6)
    assert metrics["test/acc_ci95"] == pytest.approx(1.96 * accs.std().item() / 12**0.5, abs=1e-6)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_evaluation_adapts_without_growing_memory(tmp_path, inference_mode):
    model, dm = learner(MAML(inner_lr=0.5, inner_steps=2)), tiny_data()
    t = trainer(tmp_path, inference_mode=inference_mode)
    live = []
    for _ in range(4):
        t.validate(model, dm, verbose=False)
        gc.collect()
        live.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
    assert live[-1] <= live[1]
    assert all(p.grad is None for p in model.parameters())


def test_episode_loss_is_the_training_objective(episode16):
    model = learner(MAML(inner_lr=0.5, inner_steps=1))
    out = model.episode_loss(episode16)
    assert out.loss.requires_grad and out.accuracy.shape == (4,)
    assert out.logits.shape == (4, 9, 3)
    out.loss.backward()
    assert all(p.grad is not None for p in model.learner.model.parameters())


def test_checkpoint_rebuilds_learner_and_theta_star(tmp_path):
    model, dm = learner(MetaSGD(inner_lr=0.3, inner_steps=1)), tiny_data()
    t = trainer(tmp_path, max_epochs=1)
    t.fit(model, dm)
    path = tmp_path / "learner.ckpt"
    t.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # no pickled code in our checkpoints
    assert raw["metakd_components"]["learner"]["backbone"]["init_args"]["hidden"] == 8
    loaded = MetaLearnerModule.load_from_checkpoint(path)
    assert isinstance(loaded.learner.algorithm, MetaSGD) and loaded.learner.ways == 3
    for name, value in model.learner.theta_star().items():
        assert torch.equal(loaded.learner.theta_star()[name], value), name
    before, after = model.learner.algorithm, loaded.learner.algorithm
    for a, b in zip(before.parameters(), after.parameters(), strict=True):
        assert torch.equal(a, b)  # the learned inner learning rates come back too
    first = trainer(tmp_path).test(model, dm, verbose=False)[0]
    second = trainer(tmp_path).test(loaded, dm, verbose=False)[0]
    assert first == second


def test_adapt_a_new_task_in_three_lines(tmp_path, episode16):
    model, dm = learner(MAML(inner_lr=0.5, inner_steps=1)), tiny_data()
    trainer(tmp_path, max_epochs=3).fit(model, dm)
    task = episode16.task(0)
    state = model.learner.adapt(task.support_x[0], task.support_y[0])
    predicted = model.learner.predict(state, task.query_x[0]).argmax(-1)
    assert predicted.shape == (9,)
    accuracy = (predicted == task.query_y[0]).float().mean()
    assert accuracy == model.episode_loss(task, training=False).accuracy[0]


def test_not_a_learner_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, path)
    with pytest.raises(ValueError, match="is not a lightning-metakd checkpoint"):
        MetaLearnerModule.load_from_checkpoint(path)
    (tmp_path / "junk.ckpt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        MetaLearnerModule.load_from_checkpoint(tmp_path / "junk.ckpt")
    with pytest.raises(ValueError, match="No checkpoint at"):
        MetaLearnerModule.load_from_checkpoint(tmp_path / "missing.ckpt")


def test_mismatched_episode_is_a_clear_error(episode16):
    with pytest.raises(ValueError, match="learner's MAML head is 5-way but the episode is 3-way"):
        learner(MAML(), ways=5).episode_loss(episode16)
    wrong_size = MetaLearnerModule(Conv4(hidden=8, image_size=28), ProtoNet(), ways=3)
    with pytest.raises(ValueError, match=r"built for 28x28 images but the episode \(learner\) has"):
        wrong_size.episode_loss(episode16)
    wrong_channels = MetaLearnerModule(
        Conv4(in_channels=3, hidden=8, image_size=16), ProtoNet(), ways=3
    )
    with pytest.raises(ValueError, match="expects 3-channel images"):
        wrong_channels.episode_loss(episode16)


@pytest.mark.parametrize(
    "make_algorithm",
    [lambda: MAML(inner_lr=0.5, inner_steps=2), lambda: MetaSGD(inner_lr=0.3), ProtoNet],
    ids=["MAML", "MetaSGD", "ProtoNet"],
)
def test_chunked_training_step_gives_the_same_gradients(episode16, make_algorithm):
    """One task graph at a time (the CPU default) must not change the meta-gradient."""
    grads = {}
    for chunk in (1, 3, 4):
        model = learner(make_algorithm())
        model.learner.task_chunk_size = chunk
        loss = model.training_step(episode16, 0)
        loss.backward()
        grads[chunk] = [p.grad.clone() for p in model.parameters()]
        if chunk == 4:
            assert loss.item() == pytest.approx(model.episode_loss(episode16).loss.item(), rel=1e-6)
    for chunk in (1, 3):
        for a, b in zip(grads[chunk], grads[4], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_predict_labels_the_queries_of_the_test_episodes(tmp_path):
    model, dm = learner(ProtoNet()), tiny_data()
    batches = trainer(tmp_path).predict(model, dm)
    assert sum(b["predictions"].shape[0] for b in batches) == 12  # every fixed test episode
    dm.setup()
    for batch, episode in zip(batches, dm.test_dataloader(), strict=True):
        logits = model.episode_loss(episode, training=False).logits
        assert torch.equal(batch["predictions"], logits.argmax(-1))
        assert torch.equal(batch["classes"], episode.classes.gather(1, batch["predictions"]))

"""Cached teacher outputs: the same objective as running the teacher, computed once per image."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyDataModule, make_distiller

from lightning_metakd.algorithms import MAML, Learner, ProtoNet
from lightning_metakd.data.augment import RandomAffine
from lightning_metakd.distill import FeatureHints, SoftLabels, TaskLoss
from lightning_metakd.models import Conv4
from lightning_metakd.modules import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def data() -> TinyDataModule:
    dm = TinyDataModule(ways=3, shots=2, queries=3, meta_batch_size=3, image_size=16)
    dm.setup()
    return dm


def teacher(algorithm=None, policy: str = "population") -> Learner:
    torch.manual_seed(0)
    learner = Learner(Conv4(hidden=8, image_size=16), algorithm or ProtoNet(), 3, policy)
    if policy == "population":
        learner.calibrate(data().calibration_images(8))
    return learner


def test_episodes_carry_the_sample_index_of_every_image():
    dm = data()
    episode = next(iter(dm.train_dataloader()))
    assert episode.support_index.shape == (3, 6) and episode.query_index.shape == (3, 9)
    images = dm.splits["train"]
    for t in range(3):
        for x, i in zip(episode.support_x[t], episode.support_index[t], strict=True):
            assert torch.equal(x, images.load_image(int(i)))


@pytest.mark.parametrize("vmap", [False, True])
def test_the_cached_teacher_gives_the_same_loss_and_gradients(vmap):
    dm = data()
    loader = iter(dm.train_dataloader())
    first, second = next(loader), next(loader)
    results = {}
    for cached in (False, True):
        model = make_distiller(teacher(), Conv4(hidden=4, image_size=16), cache_teachers=cached,
                               terms=[TaskLoss(), SoftLabels(weight=1.0)])  # fmt: skip
        model.student.vmap_tasks = vmap
        for batch in (first, second, first):  # the third pass is answered from the cache alone
            out = model.episode_loss(batch)
            out.loss.backward()
        results[cached] = out, [p.grad.clone() for p in model.student.parameters()], model
    (plain, plain_grads, _), (cached, cached_grads, model) = results[False], results[True]
    torch.testing.assert_close(cached.terms["soft_labels"], plain.terms["soft_labels"])
    for a, b in zip(cached_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (cache,) = model._caches
    seen = torch.cat([b.support_index.flatten() for b in (first, second)] +
                     [b.query_index.flatten() for b in (first, second)]).unique()  # fmt: skip
    assert cache.computed == len(seen)  # every image embedded exactly once


def test_what_is_not_cached():
    own = make_distiller(teacher(policy="transductive"), teacher_normalization=None)
    assert own._caches == [None]  # batch statistics, kept
    maml = make_distiller(teacher(MAML(inner_lr=0.3)), algorithm=MAML(inner_lr=0.3))
    assert maml._caches == [None]  # an adapted head is no per-image output
    hints = make_distiller(teacher(), terms=[TaskLoss(), FeatureHints()])
    assert hints._caches == [None]  # a term reads the teacher's layers
    assert make_distiller(teacher(), cache_teachers=False)._caches == [None]
    assert make_distiller(teacher())._caches[0] is not None


def fit_briefly(model, tmp_path, **data_args):
    import lightning as L

    dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=2,
                        val_episodes=2, test_episodes=2, image_size=16, **data_args)  # fmt: skip
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, dm)
    return trainer


def test_auto_gives_population_statistics_to_the_teachers_it_makes_cacheable_at_fit(tmp_path):
    cached = make_distiller(teacher(policy="transductive"))  # the default: "auto"
    assert cached.teachers[0].normalization == "transductive"  # outside fit: its own policy
    assert cached.episode_loss(next(iter(data().train_dataloader()))).loss.isfinite()
    trainer = fit_briefly(cached, tmp_path)
    assert cached.teachers[0].normalization == "population" and bool(cached.teachers[0].calibrated)
    assert cached._caches[0] is not None and cached._caches[0].computed > 0
    spec = cached.components()["teachers"][0]  # distilled with population statistics,
    assert (spec["normalization"], spec["own_normalization"]) == ("population", "transductive")
    trainer.save_checkpoint(tmp_path / "auto.ckpt")  # read back: the teacher's own policy
    (again,) = read_checkpoint(tmp_path / "auto.ckpt").teachers()
    assert again.normalization == "transductive" and bool(again.calibrated)
    maml = make_distiller(teacher(MAML(inner_lr=0.3), "transductive"), algorithm=MAML(inner_lr=0.3))
    hints = make_distiller(teacher(policy="support"), terms=[TaskLoss(), FeatureHints()])
    off = make_distiller(teacher(policy="transductive"), cache_teachers=False)
    own = make_distiller(teacher(policy="transductive"), teacher_normalization=None)
    for model in (maml, hints, off, own):
        fit_briefly(model, tmp_path)
    assert [m.teachers[0].normalization for m in (maml, hints, off, own)] == [
        "transductive",
        "support",
        "transductive",
        "transductive",
    ]  # nothing to cache, or asked for: each keeps its own policy
    assert maml._caches == hints._caches == off._caches == own._caches == [None]


def test_an_auto_checkpoint_validates_and_tests_outside_fit(tmp_path):
    """``metakd validate/test --ckpt_path`` on an "auto" distillation: the module is built from
    the config (its teacher on its own policy) and the checkpoint holds population statistics."""
    import lightning as L

    fitted = make_distiller(teacher(policy="transductive"))
    trainer = fit_briefly(fitted, tmp_path)
    trainer.save_checkpoint(tmp_path / "auto.ckpt")
    expected = trainer.test(fitted, trainer.datamodule, verbose=False)[0]
    fresh = make_distiller(teacher(policy="transductive"))
    assert fresh.teachers[0].normalization == "transductive"
    again = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    result = again.test(fresh, trainer.datamodule, ckpt_path=tmp_path / "auto.ckpt", verbose=False)
    assert result[0] == pytest.approx(expected, abs=1e-6)
    assert fresh.teachers[0].normalization == "population" and bool(fresh.teachers[0].calibrated)
    loaded, estimated = (dict(m.teachers[0].population.named_buffers()) for m in (fresh, fitted))
    assert loaded.keys() == estimated.keys() and len(loaded) == 8  # 4 BatchNorms: mean, var
    assert all(torch.equal(loaded[k], estimated[k]) for k in loaded)  # the fit's, not new ones
    assert fresh.components()["teachers"][0]["own_normalization"] == "transductive"
    own = make_distiller(teacher(policy="transductive"), teacher_normalization=None)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # asked for its own policy: strict
        again.validate(own, trainer.datamodule, ckpt_path=tmp_path / "auto.ckpt", verbose=False)


def test_auto_keeps_the_own_policy_when_the_training_images_are_augmented(tmp_path):
    model = make_distiller(teacher(policy="transductive"))
    fit_briefly(model, tmp_path, train_transform=RandomAffine())
    assert model._caches == [None]
    assert model.teachers[0].normalization == "transductive"
    assert not bool(getattr(model.teachers[0], "calibrated", False))  # nothing estimated


def test_a_teacher_normalisation_override_is_recorded_with_the_teacher():
    model = make_distiller(teacher(policy="transductive"), teacher_normalization="population")
    assert model.teachers[0].normalization == "population"
    assert model.components()["teachers"][0]["normalization"] == "population"
    with pytest.raises(
        ValueError, match="unknown normalization 'running'.*'auto' \\(the default\\)"
    ):
        make_distiller(teacher(), teacher_normalization="running")


def test_fit_calibrates_the_teacher_and_fills_the_cache(tmp_path):
    import lightning as L

    model = make_distiller(teacher(policy="transductive"), teacher_normalization="population")
    dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=3,
                        val_episodes=2, test_episodes=2, image_size=16)  # fmt: skip
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path).fit(model, dm)  # fmt: skip
    assert bool(model.teachers[0].calibrated)
    (cache,) = model._caches
    assert 0 < cache.computed <= 3 * 2 * 3 * 3  # at most every image of the 3 steps


def test_stored_views_keep_the_cache_one_row_per_view(tmp_path):
    """``train_views``: "auto" still gives population statistics and caches, now per view; the
    cached teacher answers each view as running the teacher on it does."""
    model = make_distiller(teacher(policy="transductive"))
    trainer = fit_briefly(model, tmp_path, train_transform=RandomAffine(degrees=20), train_views=2)
    assert model.teachers[0].normalization == "population"
    (cache,) = model._caches
    assert cache is not None and cache.computed > 0
    train = trainer.datamodule.splits["train"]
    assert len(cache.table) <= 2 * len(train)
    loader = iter(trainer.datamodule.train_dataloader())
    batches = [next(loader) for _ in range(2)]
    results = {}
    for cached in (False, True):
        distiller = make_distiller(teacher(), Conv4(hidden=4, image_size=16), cache_teachers=cached,
                                   terms=[TaskLoss(), SoftLabels(weight=1.0)])  # fmt: skip
        for batch in (*batches, batches[0]):
            out = distiller.episode_loss(batch)
        results[cached] = out.terms["soft_labels"], distiller._caches[0]
    torch.testing.assert_close(results[True][0], results[False][0])
    seen = torch.cat([b.support_index.flatten() for b in batches] +
                     [b.query_index.flatten() for b in batches]).unique()  # fmt: skip
    assert results[True][1].computed == len(seen)  # one teacher pass per view drawn


def test_knowledge_epochs_stop_the_knowledge_terms_and_the_teachers(tmp_path):
    """Early-stopped distillation: every term for the first epoch, then the task loss alone, and
    the teachers no longer run (their cache stops growing)."""
    import lightning as L

    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            cache = pl_module._caches[0]
            terms = sorted(pl_module.episode_loss(batch).terms)
            seen.append((trainer.current_epoch, terms, pl_module._needs_teachers(), cache.computed))

    model = make_distiller(teacher(policy="transductive"), knowledge_epochs=1,
                           terms=[TaskLoss(), SoftLabels(weight=1.0)])  # fmt: skip
    dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=2,
                        val_episodes=2, test_episodes=2, image_size=16)  # fmt: skip
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
              default_root_dir=tmp_path).fit(model, dm)  # fmt: skip
    assert [(e, t, n) for e, t, n, _ in seen] == [
        (0, ["soft_labels", "task"], True), (0, ["soft_labels", "task"], True),
        (1, ["task"], False), (1, ["task"], False), (2, ["task"], False), (2, ["task"], False),
    ]  # fmt: skip
    computed = [c for *_, c in seen]
    assert computed[2] > 0 and computed[2:] == [computed[2]] * 4  # no teacher pass after the stop
    assert not model.knowledge_on() and model.hparams["knowledge_epochs"] == 1
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="knowledge_epochs must be a whole number"):
            make_distiller(teacher(), knowledge_epochs=bad)

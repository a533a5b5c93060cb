"""DistillationModule: every loss term, the frozen teacher, vmap, checkpoints, and that it helps."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from conftest import TinyDataModule, make_distiller

from lightning_metakd.algorithms import MAML, Learner, ProtoNet
from lightning_metakd.distill import (
    AttentionDistillation,
    AttentionTransfer,
    FeatureHints,
    ParameterAnchor,
    SoftLabels,
    TaskLoss,
    slice_state,
)
from lightning_metakd.models import Conv4, VisionTransformer
from lightning_metakd.modules import DistillationModule, MetaLearnerModule

ADAM = functools.partial(torch.optim.Adam, lr=5e-3)


def tiny_data(**kwargs) -> TinyDataModule:
    defaults = dict(
        ways=3, shots=1, queries=3, meta_batch_size=4, steps_per_epoch=4, val_episodes=4,
        test_episodes=12, image_size=16,
    )  # fmt: skip
    defaults.update(kwargs)
    return TinyDataModule(**defaults)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_val_batches=0,
    )  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture(scope="module")
def episode():
    dm = tiny_data()
    dm.setup()
    return next(iter(dm.train_dataloader()))


def conv_teacher(algorithm=None, hidden: int = 8) -> MetaLearnerModule:
    torch.manual_seed(0)
    return MetaLearnerModule(Conv4(hidden=hidden, image_size=16), algorithm or ProtoNet(), ways=3)


def vit(depth: int = 4, heads: int = 4, embed_dim: int = 16) -> VisionTransformer:
    return VisionTransformer(
        image_size=16, patch_size=4, embed_dim=embed_dim, depth=depth, heads=heads
    )


def distiller(teacher, backbone=None, algorithm=None, **kwargs):
    return make_distiller(teacher, backbone, algorithm, **kwargs)


# -- the objective ---------------------------------------------------------------------------------
CONV_TERMS = {
    "soft_labels": dict(soft_labels=0.7),
    "feature_hints": dict(feature_hints=0.3),
    "attention_transfer": dict(attention_transfer=2.0),
    "anchor": dict(anchor=0.01, init_from_teacher=True),
}


@pytest.mark.parametrize(
    "algorithm", [ProtoNet, lambda: MAML(inner_lr=0.5)], ids=["ProtoNet", "MAML"]
)
def test_each_term_adds_exactly_its_value(episode, algorithm):
    teacher = conv_teacher(algorithm())
    base = distiller(teacher, algorithm=algorithm(), soft_labels=0.0).episode_loss(episode)
    assert set(base.terms) == {"task"}
    assert base.loss.item() == base.terms["task"].item()
    for term, kwargs in CONV_TERMS.items():
        # init_from_teacher changes the student, so the anchor is compared with its own base
        reference = base
        if kwargs.get("init_from_teacher"):
            reference = distiller(
                teacher, algorithm=algorithm(), soft_labels=0.0, init_from_teacher=True
            ).episode_loss(episode)
        out = distiller(
            teacher, algorithm=algorithm(), **{"soft_labels": 0.0, **kwargs}
        ).episode_loss(episode)
        assert set(out.terms) == {"task", term}
        torch.testing.assert_close(out.terms["task"], reference.terms["task"])
        torch.testing.assert_close(out.loss - reference.loss, out.terms[term])
        assert out.terms[term].item() > 0 or term == "anchor"


def test_attention_term_adds_exactly_its_value(episode):
    torch.manual_seed(0)
    teacher = MetaLearnerModule(vit(), ProtoNet(), ways=3)
    student = functools.partial(vit, depth=2, heads=2)
    base = distiller(teacher, student, soft_labels=0.0)
    out = distiller(teacher, student, soft_labels=0.0, attention=5.0)
    base, out = base.episode_loss(episode), out.episode_loss(episode)
    assert out.terms["attention"].item() > 0
    torch.testing.assert_close(out.loss - base.loss, out.terms["attention"])


def test_training_step_logs_only_the_terms_that_are_on(tmp_path):
    model = distiller(conv_teacher(), feature_hints=0.5, terms=None)
    model.terms.append(AttentionTransfer(weight=0.0))  # off: neither computed nor logged
    t = trainer(tmp_path, max_steps=1)
    t.fit(model, tiny_data())
    logged = {k for k in t.callback_metrics if k.startswith("train/")}
    assert logged == {"train/loss", "train/acc", "train/loss_task", "train/loss_soft_labels",
                      "train/loss_feature_hints"}  # fmt: skip
    m = t.callback_metrics
    total = m["train/loss_task"] + m["train/loss_soft_labels"] + m["train/loss_feature_hints"]
    torch.testing.assert_close(total, m["train/loss"])


def test_chunked_training_step_equals_the_whole_batch(episode):
    losses, grads = {}, {}
    for chunk in (1, 4):
        model = distiller(conv_teacher(), feature_hints=0.5, anchor=0.01,
                          init_from_teacher=True, task_chunk_size=chunk)  # fmt: skip
        loss = model.training_step(episode, 0)
        loss.backward()
        losses[chunk] = loss.item()
        grads[chunk] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert losses[1] == pytest.approx(losses[4], rel=1e-5)
    for a, b in zip(grads[1], grads[4], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "algorithm", [ProtoNet, lambda: MAML(inner_lr=0.5)], ids=["ProtoNet", "MAML"]
)
def test_student_that_is_the_teacher_has_zero_distillation_loss(episode, algorithm):
    teacher = conv_teacher(algorithm())
    model = distiller(
        teacher, Conv4(hidden=8, image_size=16), algorithm(), init_from_teacher=True,
        feature_hints=1.0, attention_transfer=1.0, anchor=1.0,
    )  # fmt: skip
    terms = model.episode_loss(episode).terms
    for term in ("soft_labels", "feature_hints", "attention_transfer", "anchor"):
        assert terms[term].item() == pytest.approx(0.0, abs=1e-6), term
    assert terms["task"].item() > 0


def test_vit_student_that_is_the_teacher_has_zero_attention_loss(episode):
    torch.manual_seed(0)
    teacher = MetaLearnerModule(vit(), ProtoNet(), ways=3)
    model = distiller(teacher, vit(), init_from_teacher=True, attention=1.0,
                      feature_hints=1.0, anchor=1.0)  # fmt: skip
    terms = model.episode_loss(episode).terms
    for term in ("soft_labels", "feature_hints", "attention", "anchor"):
        assert terms[term].item() == pytest.approx(0.0, abs=1e-6), term


def test_theta_star_selection_is_an_argument(episode):
    teacher = conv_teacher()
    by_rule = {}
    for rule in ("bn_gamma", "l1"):
        model = distiller(teacher, init_from_teacher=True, theta_star_selection=rule)
        sliced = slice_state(teacher.learner.model, Conv4(hidden=4, image_size=16), rule)
        for name, value in sliced.items():
            assert torch.equal(model.student.model.state_dict()[name], value), (rule, name)
        by_rule[rule] = sliced
        assert model.hparams["theta_star_selection"] == rule
    assert any(not torch.equal(by_rule["l1"][k], v) for k, v in by_rule["bn_gamma"].items())
    with pytest.raises(ValueError, match="unknown selection 'gamma'; use one of"):
        distiller(teacher, init_from_teacher=True, theta_star_selection="gamma")
    with pytest.raises(ValueError, match="selection='taylor' needs data: pass selection="):
        distiller(teacher, init_from_teacher=True, theta_star_selection="taylor")


def test_init_from_teacher_at_full_width_reproduces_the_teacher(episode):
    teacher = conv_teacher(MAML(inner_lr=0.5))
    model = distiller(teacher, Conv4(hidden=8, image_size=16), MAML(inner_lr=0.5),
                      init_from_teacher=True)  # fmt: skip
    student = model.student_learner()
    assert torch.equal(student.evaluate(episode).logits, teacher.learner.evaluate(episode).logits)
    narrow = distiller(teacher, Conv4(hidden=4, image_size=16), MAML(inner_lr=0.5),
                       init_from_teacher=True, anchor=0.1)  # fmt: skip
    sliced = slice_state(teacher.learner.model, narrow.student.model)
    (anchor,) = [t for t in narrow.terms if isinstance(t, ParameterAnchor)]
    for name, value in anchor.theta_star.items():
        assert torch.equal(value, sliced[name]), name
        assert torch.equal(narrow.student.model.get_parameter(name), sliced[name]), name


# -- the frozen teacher ------------------------------------------------------------------------
def test_gradients_reach_the_student_and_projector_never_the_teacher(tmp_path):
    teacher = conv_teacher(MAML(inner_lr=0.5))
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = distiller(teacher, algorithm=MAML(inner_lr=0.5), feature_hints=1.0)
    student = {k: v.clone() for k, v in model.student.state_dict().items()}
    (hints,) = [t for t in model.terms if isinstance(t, FeatureHints)]
    projector = [p.clone() for p in hints.parameters()]
    assert len(projector) == 2  # a 1x1 conv from 4 to 8 channels
    trainer(tmp_path, max_steps=3).fit(model, tiny_data())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.learner.training  # the teacher module's learner is what distils
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, frozen[name]), name
    assert any(not torch.equal(v, student[k]) for k, v in model.student.state_dict().items())
    for before, after in zip(projector, hints.parameters(), strict=True):
        assert not torch.equal(before, after)


def test_vit_attention_with_depth_and_head_mismatch_trains(episode):
    torch.manual_seed(0)
    teacher = MetaLearnerModule(vit(depth=4, heads=4), ProtoNet(), ways=3)
    model = distiller(teacher, vit(depth=2, heads=2, embed_dim=8), attention=1.0)
    (attention,) = [t for t in model.terms if isinstance(t, AttentionDistillation)]
    assert attention.layer_maps() == [[1, 3]]
    loss = model.training_step(episode, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.student.model.parameters())


def conv_maml_distiller():
    return distiller(conv_teacher(MAML(inner_lr=0.5)), algorithm=MAML(inner_lr=0.5),
                     feature_hints=0.5, attention_transfer=1.0)  # fmt: skip


def vit_distiller():
    torch.manual_seed(0)
    teacher = MetaLearnerModule(vit(), ProtoNet(), ways=3)
    return distiller(teacher, functools.partial(vit, depth=2, heads=2), attention=1.0,
                     feature_hints=0.5)  # fmt: skip


@pytest.mark.parametrize("make", [conv_maml_distiller, vit_distiller], ids=["Conv4-MAML", "ViT"])
def test_vmap_path_equals_loop_path(episode, make):
    results = {}
    for vmap_tasks in (False, True):
        model = make()
        model.student.vmap_tasks = vmap_tasks
        out = model.episode_loss(episode)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[vmap_tasks] = out, grads
    (loop, loop_grads), (vmapped, vmap_grads) = results[False], results[True]
    for name in loop.terms:
        torch.testing.assert_close(vmapped.terms[name], loop.terms[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(loop_grads, vmap_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- checkpoints and the standalone student ----------------------------------------------------
def test_checkpoint_round_trip_without_the_teacher_file(tmp_path):
    dm = tiny_data()
    teacher_path = tmp_path / "teacher.ckpt"
    teacher_trainer = trainer(tmp_path, max_steps=1)
    teacher_trainer.fit(conv_teacher(), dm)
    teacher_trainer.save_checkpoint(teacher_path)
    model = distiller(str(teacher_path), feature_hints=0.5, anchor=0.1,
                      init_from_teacher=True)  # fmt: skip
    assert model.hparams["teacher"] == str(teacher_path)
    t = trainer(tmp_path, max_steps=2)
    t.fit(model, dm)
    path = tmp_path / "distilled.ckpt"
    t.save_checkpoint(path)
    teacher_path.unlink()  # the distilled checkpoint holds the teacher
    raw = torch.load(path, weights_only=True)
    components = raw["metakd_components"]
    assert components["student"]["backbone"]["init_args"]["hidden"] == 4
    assert [t["class_path"].rpartition(".")[2] for t in components["terms"]] == [
        "TaskLoss", "SoftLabels", "FeatureHints", "ParameterAnchor"
    ]  # fmt: skip
    loaded = DistillationModule.load_from_checkpoint(path)
    assert [(t.name, t.weight) for t in loaded.terms] == [(t.name, t.weight) for t in model.terms]
    assert len(loaded.teachers) == 1
    state, restored = model.state_dict(), loaded.state_dict()
    assert set(state) == set(restored)
    for name, value in state.items():
        assert torch.equal(restored[name], value), name
    first = trainer(tmp_path).test(model, dm, verbose=False)[0]
    second = trainer(tmp_path).test(loaded, dm, verbose=False)[0]
    assert first == second


def test_student_learner_has_the_same_test_accuracy(tmp_path):
    model, dm = distiller(conv_teacher(), init_from_teacher=True), tiny_data()
    trainer(tmp_path, max_steps=2).fit(model, dm)
    distilled = trainer(tmp_path).test(model, dm, verbose=False)[0]
    student = model.student_learner()
    assert isinstance(student, Learner)
    module = MetaLearnerModule(student.backbone, student.algorithm, ways=3)
    module.learner.load_state_dict(student.state_dict())
    alone = trainer(tmp_path).test(module, dm, verbose=False)[0]
    assert set(distilled) == set(alone) == {"test/acc", "test/acc_ci95", "test/loss"}
    assert alone == distilled


@pytest.mark.slow
def test_distilled_student_beats_its_undistilled_twin(tmp_path):
    """A teacher trained 8x longer, a Conv4-4 student trained 5 steps: θ* transfer + soft labels."""
    dm = tiny_data(steps_per_epoch=10, test_episodes=40)
    teacher = conv_teacher(hidden=16)
    teacher.optimizer_factory = ADAM
    trainer(tmp_path, max_epochs=-1, max_steps=40).fit(teacher, dm)
    torch.manual_seed(1)
    twin = MetaLearnerModule(Conv4(hidden=4, image_size=16), ProtoNet(), ways=3, optimizer=ADAM)
    L.seed_everything(1)
    trainer(tmp_path, max_steps=5).fit(twin, dm)
    model = distiller(teacher, init_from_teacher=True, soft_labels=1.0)
    L.seed_everything(1)
    trainer(tmp_path, max_steps=5).fit(model, dm)
    undistilled = trainer(tmp_path).test(twin, dm, verbose=False)[0]["test/acc"]
    distilled = trainer(tmp_path).test(model, dm, verbose=False)[0]["test/acc"]
    assert distilled > undistilled + 0.1


# -- bad input ----------------------------------------------------------------------------------
def test_bad_terms_are_clear_errors():
    teacher = conv_teacher()
    with pytest.raises(ValueError, match="weight must be a non-negative"):
        SoftLabels(weight=-1.0)
    with pytest.raises(ValueError, match="weight must be a non-negative"):
        ParameterAnchor(weight=float("nan"))
    with pytest.raises(ValueError, match="temperature must be a positive"):
        SoftLabels(temperature=0)
    with pytest.raises(ValueError, match="every term's weight is 0"):
        distiller(teacher, terms=[TaskLoss(weight=0.0), SoftLabels(weight=0.0)])
    with pytest.raises(ValueError, match=r"both named \['soft_labels'\].*name"):
        distiller(teacher, terms=[TaskLoss(), SoftLabels(), SoftLabels(temperature=2)])
    distiller(teacher, terms=[TaskLoss(), SoftLabels(), SoftLabels(temperature=2, name="soft_t2")])
    with pytest.raises(TypeError, match="terms must be DistillationTerm objects"):
        distiller(teacher, terms=[torch.nn.MSELoss()])
    with pytest.raises(ValueError, match="temperatures list has 2 entries for 1 teacher"):
        distiller(teacher, terms=[TaskLoss(), SoftLabels(teacher_temperatures=[1.0, 2.0])])


def test_bad_teacher_is_a_clear_error(tmp_path, episode):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, path)
    with pytest.raises(ValueError, match="is not a lightning-metakd checkpoint"):
        distiller(str(path)).setup("fit")  # a path is read when the Trainer starts
    missing = distiller(str(tmp_path / "not-yet.ckpt"))  # a config written before the teacher
    with pytest.raises(FileNotFoundError, match="No teacher checkpoint at .*train the teacher"):
        missing.setup("fit")
    with pytest.raises(TypeError, match="teacher must be a Learner, a MetaLearnerModule"):
        distiller(Conv4())
    head = MetaLearnerModule(Conv4(hidden=8, image_size=16), MAML(), ways=5)
    with pytest.raises(ValueError, match="teacher's MAML head is 5-way but this module trains"):
        distiller(head, algorithm=MAML())
    wrong_size = MetaLearnerModule(Conv4(hidden=8, image_size=28), ProtoNet(), ways=3)
    with pytest.raises(ValueError, match="28x28 images but the episode \\(teacher\\)"):
        distiller(wrong_size).episode_loss(episode)


def test_anchor_between_incompatible_shapes_is_a_clear_error():
    teacher = conv_teacher()
    with pytest.raises(ValueError, match="ParameterAnchor needs θ\\* .*init_from_teacher"):
        distiller(teacher, Conv4(hidden=4, image_size=16), anchor=0.1)
    with pytest.raises(ValueError, match="slice_state supports a Conv4 or ResNet12"):
        distiller(teacher, vit(), init_from_teacher=True)
    with pytest.raises(
        ValueError, match="AttentionDistillation .*needs the 'attention' tap points"
    ):
        distiller(teacher, attention=1.0)
    with pytest.raises(
        ValueError, match=r"AttentionTransfer compares conv feature maps.*give \(2, 17, 16\)"
    ):
        distiller(MetaLearnerModule(vit(), ProtoNet(), ways=3), vit(), attention_transfer=1.0)

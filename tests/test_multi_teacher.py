"""Several teachers: the ensemble target, one projector each, frozen teachers, checkpoints, report."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import TinyDataModule, make_distiller

from lightning_metakd.algorithms import MAML, ProtoNet
from lightning_metakd.distill import (
    AttentionDistillation,
    FeatureHints,
    SoftLabels,
    TaskLoss,
    TeacherEnsemble,
    ensemble_probabilities,
    ensemble_weights,
    soft_label_loss,
)
from lightning_metakd.evaluation import mean_ci95
from lightning_metakd.models import Conv4, VisionTransformer
from lightning_metakd.modules import DistillationModule, MetaLearnerModule
from lightning_metakd.report import compare, distillation_learners

ROOT = Path(__file__).resolve().parents[1]
ADAM = functools.partial(torch.optim.Adam, lr=5e-3)
#: every term a Conv4 student can have, with θ* from teacher 0
CONV_TERMS = dict(
    soft_labels=0.7, feature_hints=0.3, attention_transfer=2.0, anchor=0.01, init_from_teacher=True
)


def tiny_data(**kwargs) -> TinyDataModule:
    defaults = dict(
        ways=3, shots=1, queries=3, meta_batch_size=4, steps_per_epoch=4, val_episodes=4,
        test_episodes=12, image_size=16,
    )  # fmt: skip
    return TinyDataModule(**{**defaults, **kwargs})


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_val_batches=0,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def episode():
    dm = tiny_data()
    dm.setup()
    return next(iter(dm.train_dataloader()))


def teacher_of(algorithm, hidden: int = 8, seed: int = 0) -> MetaLearnerModule:
    torch.manual_seed(seed)
    return MetaLearnerModule(Conv4(hidden=hidden, image_size=16), algorithm, ways=3)


def teacher_of_vit() -> MetaLearnerModule:
    torch.manual_seed(0)
    return MetaLearnerModule(vit(depth=2, heads=2), MAML(inner_lr=0.5), ways=3)


def vit(depth: int, heads: int, embed_dim: int = 16) -> VisionTransformer:
    return VisionTransformer(
        image_size=16, patch_size=4, embed_dim=embed_dim, depth=depth, heads=heads
    )


def distiller(teacher, algorithm=None, backbone=None, **kwargs):
    return make_distiller(teacher, backbone, algorithm, **kwargs)


def term(model: DistillationModule, kind: type):
    (found,) = [t for t in model.terms if isinstance(t, kind)]
    return found


def projector(model: DistillationModule, k: int):
    """The (first) hint projector of teacher ``k``."""
    return term(model, FeatureHints).projectors[k][0]


def copy_projector(model: DistillationModule, into: int, source: int = 0) -> None:
    """Give projector ``into`` the initial weights of ``source`` (each is drawn at random)."""
    projector(model, into).load_state_dict(projector(model, source).state_dict())


# -- the objective -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "algorithm", [ProtoNet, lambda: MAML(inner_lr=0.5)], ids=["ProtoNet", "MAML"]
)
def test_two_identical_teachers_give_the_one_teacher_loss(episode, algorithm):
    teacher = teacher_of(algorithm())
    one = distiller(copy.deepcopy(teacher), algorithm(), **CONV_TERMS).double()
    two = distiller([teacher, copy.deepcopy(teacher)], algorithm(), **CONV_TERMS).double()
    copy_projector(two, into=1)
    episode = episode.to(dtype=torch.float64)
    outputs, grads = [], []
    for model in (one, two):
        out = model.episode_loss(episode)
        out.loss.backward()
        outputs.append(out)
        grads.append([p.grad for p in model.student.parameters()])
    (a, b), tight = outputs, dict(rtol=1e-12, atol=1e-14)
    assert (
        set(a.terms)
        == set(b.terms)
        == {"task", "soft_labels", "feature_hints", "attention_transfer", "anchor"}
    )
    assert a.loss.dtype == torch.float64 and a.terms["soft_labels"].dtype == torch.float64
    for name in a.terms:
        torch.testing.assert_close(b.terms[name], a.terms[name], **tight, msg=name)
    torch.testing.assert_close(b.loss, a.loss, **tight)
    assert a.terms["soft_labels"] > 0 and a.terms["feature_hints"] > 0
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-13)


def test_two_identical_vit_teachers_give_the_one_teacher_attention_loss(episode):
    torch.manual_seed(0)
    teacher = MetaLearnerModule(vit(depth=4, heads=4), ProtoNet(), ways=3)
    student = functools.partial(vit, depth=2, heads=2, embed_dim=8)
    terms = dict(attention=5.0, feature_hints=0.5)
    one = distiller(copy.deepcopy(teacher), backbone=student, **terms).double()
    two = distiller([teacher, copy.deepcopy(teacher)], backbone=student, **terms).double()
    copy_projector(two, into=1)
    a, b = (m.episode_loss(episode.to(dtype=torch.float64)) for m in (one, two))
    assert term(two, AttentionDistillation).layer_maps() == [[1, 3], [1, 3]]
    assert a.terms["attention"] > 0
    for name in a.terms:
        torch.testing.assert_close(b.terms[name], a.terms[name], rtol=1e-12, atol=1e-14)


def test_teacher_weights_one_zero_is_the_first_teacher_alone(episode):
    first = teacher_of(MAML(inner_lr=0.5))
    second = teacher_of(MAML(inner_lr=0.5, inner_steps_test=2), hidden=16, seed=3)
    terms = dict(CONV_TERMS, temperature=2.0)
    student = MAML(inner_lr=0.5)
    alone = distiller(copy.deepcopy(first), student, **terms).double()
    episode = episode.to(dtype=torch.float64)
    reference = alone.episode_loss(episode)
    pair = [copy.deepcopy(first), copy.deepcopy(second)]
    weighted = distiller(pair, student, teacher_weights=[3.0, 0.0], **terms).double()
    assert weighted.teacher_weights == [1.0, 0.0]
    out = weighted.episode_loss(episode)
    for name in reference.terms:
        torch.testing.assert_close(out.terms[name], reference.terms[name], rtol=1e-12, atol=1e-14)
    # Control: with a weight of its own the second teacher changes every teacher-dependent term.
    mixed = distiller([first, second], student, **terms).double()
    assert mixed.teacher_weights == [0.5, 0.5]
    out = mixed.episode_loss(episode)
    for name in ("soft_labels", "feature_hints", "attention_transfer"):
        assert abs(out.terms[name].item() - reference.terms[name].item()) > 1e-4, name
    torch.testing.assert_close(out.terms["task"], reference.terms["task"])  # θ* of teacher 0


def test_the_soft_target_is_the_mean_of_tempered_probabilities(episode):
    teachers = [teacher_of(ProtoNet()), teacher_of(MAML(inner_lr=0.5), seed=2)]
    model = distiller(teachers, teacher_weights=[1.0, 3.0], task=0.0, temperature=3.0)
    out = model.episode_loss(episode)
    expected = []
    for t in range(episode.num_tasks):
        task = episode.task(t)
        logits = [teacher.learner.evaluate(task).logits[0] for teacher in teachers]
        probs = 0.25 * torch.softmax(logits[0] / 3, -1) + 0.75 * torch.softmax(logits[1] / 3, -1)
        expected.append(soft_label_loss(out.logits[t], teacher_probs=probs, temperature=3.0))
    torch.testing.assert_close(out.terms["soft_labels"], torch.stack(expected).mean())


def test_vmap_path_equals_loop_path_with_two_teachers(episode):
    teachers = [teacher_of(ProtoNet()), teacher_of(MAML(inner_lr=0.5), seed=2)]
    results = []
    for vmap_tasks in (False, True):
        model = distiller(teachers, feature_hints=0.5, attention_transfer=1.0)
        model.student.vmap_tasks = vmap_tasks
        out = model.episode_loss(episode)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loop, loop_grads), (vmapped, vmap_grads) = results
    for name in loop.terms:
        torch.testing.assert_close(vmapped.terms[name], loop.terms[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(loop_grads, vmap_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ensemble_functions():
    assert ensemble_weights([2, 2, 4], 3) == [0.25, 0.25, 0.5]
    z = torch.randn(5, 4)
    torch.testing.assert_close(ensemble_probabilities([z, z], [0.3, 0.7]), torch.softmax(z, -1))
    with pytest.raises(ValueError, match="teachers' logits differ in shape"):
        ensemble_probabilities([z, z[:, :3]])


# -- the frozen teachers -----------------------------------------------------------------------
def test_gradients_never_reach_any_teacher(tmp_path, episode):
    teachers = [teacher_of(ProtoNet()), teacher_of(MAML(inner_lr=0.5), hidden=16, seed=2)]
    frozen = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    model = distiller(teachers, feature_hints=1.0, attention_transfer=1.0)
    model.episode_loss(episode).loss.backward()
    assert all(p.grad is None and not p.requires_grad for t in teachers for p in t.parameters())
    assert all(p.grad is not None for p in projector(model, 1).parameters())
    model.zero_grad()
    student = {k: v.clone() for k, v in model.student.state_dict().items()}
    projectors = [[p.clone() for p in projector(model, k).parameters()] for k in (0, 1)]
    assert [len(p) for p in projectors] == [2, 2]  # 1x1 convs from 4 to 8 and to 16 channels
    trainer(tmp_path, max_steps=3).fit(model, tiny_data())
    assert list(model.teachers) == [t.learner for t in teachers]
    for teacher, before in zip(teachers, frozen, strict=True):
        assert not teacher.learner.training
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        for name, value in teacher.state_dict().items():
            assert torch.equal(value, before[name]), name
    assert any(not torch.equal(v, student[k]) for k, v in model.student.state_dict().items())
    for k, before in enumerate(projectors):
        for old, new in zip(before, projector(model, k).parameters(), strict=True):
            assert not torch.equal(old, new), k


# -- checkpoints -------------------------------------------------------------------------------
def save_teacher(tmp_path, algorithm, name: str, seed: int, **kwargs) -> str:
    torch.manual_seed(seed)
    learner = MetaLearnerModule(Conv4(image_size=kwargs.pop("image_size", 16), **kwargs),
                                algorithm, ways=3, optimizer=ADAM)  # fmt: skip
    run = trainer(tmp_path, max_steps=1)
    run.fit(learner, tiny_data(image_size=learner.learner.backbone.image_size))
    path = tmp_path / name
    run.save_checkpoint(path)
    return str(path)


def test_checkpoint_round_trip_with_two_teachers(tmp_path, episode):
    paths = [
        save_teacher(tmp_path, ProtoNet(), "protonet.ckpt", seed=0, hidden=8),
        save_teacher(tmp_path, MAML(inner_lr=0.5), "maml.ckpt", seed=2, hidden=16),
    ]
    model = distiller(paths, teacher_weights=[2.0, 1.0], feature_hints=0.5, anchor=0.1,
                      init_from_teacher=True)  # fmt: skip
    assert len(model.teachers) == 0 and model.hparams["teacher"] == paths  # read when fit starts
    dm = tiny_data()
    run = trainer(tmp_path, max_steps=2)
    run.fit(model, dm)
    assert model.num_teachers == 2 and model.teachers[1].backbone.hidden == 16
    path = tmp_path / "distilled.ckpt"
    run.save_checkpoint(path)
    for p in paths:
        Path(p).unlink()  # the distilled checkpoint holds both teachers
    raw = torch.load(path, weights_only=True)
    specs = raw["metakd_components"]["teachers"]
    assert [s["algorithm"]["class_path"].rsplit(".", 1)[1] for s in specs] == ["ProtoNet", "MAML"]
    loaded = DistillationModule.load_from_checkpoint(path)
    assert loaded.num_teachers == 2 and loaded.teacher_weights == pytest.approx([2 / 3, 1 / 3])
    state, restored = model.state_dict(), loaded.state_dict()
    assert {k.split(".")[0] for k in state} == {"student", "teachers", "terms"}
    assert {k.split(".")[1] for k in state if k.startswith("teachers.")} == {"0", "1"}
    assert set(state) == set(restored)
    for name, value in state.items():
        assert torch.equal(restored[name], value), name
    torch.testing.assert_close(loaded.episode_loss(episode).loss, model.episode_loss(episode).loss)
    assert trainer(tmp_path).test(model, dm, verbose=False) == trainer(tmp_path).test(
        loaded, dm, verbose=False
    )


# -- the report --------------------------------------------------------------------------------
def test_report_lists_each_teacher_the_ensemble_and_the_student(tmp_path):
    dm = tiny_data(test_episodes=10)
    teachers = [teacher_of(ProtoNet()), teacher_of(MAML(inner_lr=0.5), hidden=16, seed=2)]
    model = distiller(teachers, teacher_weights=[1.0, 3.0])
    learners = distillation_learners(model)
    assert list(learners) == ["teacher 0 (ProtoNet Conv4)", "teacher 1 (MAML Conv4)",
                              "ensemble of teachers", "distilled student"]  # fmt: skip
    rows = compare(learners, dm, tmp_path, warmup=0, repeats=1, plot=False)
    by_name = {r["name"]: r for r in rows}
    dm.setup("test")
    batches = list(dm.test_dataloader())
    own, voted = [[] for _ in teachers], []
    for batch in batches:
        probs = []
        for k, teacher in enumerate(teachers):
            out = teacher.learner.evaluate(batch)
            own[k].append(out.accuracy)
            probs.append(torch.softmax(out.logits, -1))
        ensemble = 0.25 * probs[0] + 0.75 * probs[1]
        voted.append((ensemble.argmax(-1) == batch.query_y).float().mean(1))
    for k, name in enumerate(list(learners)[:2]):
        mean, ci95 = mean_ci95(torch.cat(own[k]))
        assert by_name[name]["accuracy"] == pytest.approx(mean, abs=1e-9)
        assert by_name[name]["ci95"] == pytest.approx(ci95, abs=1e-9)
    mean, ci95 = mean_ci95(torch.cat(voted))
    row = by_name["ensemble of teachers"]
    assert row["accuracy"] == pytest.approx(mean, abs=1e-9)
    assert row["ci95"] == pytest.approx(ci95, abs=1e-9)
    assert row["parameters"] == sum(by_name[n]["parameters"] for n in list(learners)[:2])
    assert row["flops"] > max(by_name[n]["flops"] for n in list(learners)[:2])
    # the distiller's own teachers were not moved or changed by measuring copies
    assert model.teachers[1] is teachers[1].learner
    one = distillation_learners(distiller(teachers[0]))
    assert list(one) == ["teacher", "distilled student"]


def test_ensemble_of_copies_of_one_teacher_predicts_like_it(episode):
    teacher = teacher_of(MAML(inner_lr=0.5))
    learner = teacher.learner
    ensemble = TeacherEnsemble([learner, copy.deepcopy(learner)], weights=[0.2, 0.8])
    alone, voted = learner.evaluate(episode), ensemble.evaluate(episode)
    assert torch.equal(voted.accuracy, alone.accuracy)
    torch.testing.assert_close(voted.logits.exp(), torch.softmax(alone.logits, -1))
    torch.testing.assert_close(voted.loss, alone.loss)
    support_x, support_y, query_x = episode.support_x[0], episode.support_y[0], episode.query_x[0]
    states = ensemble.adapt(support_x, support_y, "transductive")  # as evaluate() normalises
    torch.testing.assert_close(
        ensemble.predict(states, query_x), torch.log_softmax(alone.logits[0], -1)
    )


# -- bad input ---------------------------------------------------------------------------------
def test_bad_teacher_lists_are_clear_errors():
    protonet, maml = teacher_of(ProtoNet()), teacher_of(MAML(inner_lr=0.5), seed=2)
    with pytest.raises(ValueError, match="teacher_weights has 1 entries for 2 teachers"):
        distiller([protonet, maml], teacher_weights=[1.0])
    with pytest.raises(ValueError, match="teacher_weights must be non-negative finite"):
        distiller([protonet, maml], teacher_weights=[1.0, -0.5])
    with pytest.raises(ValueError, match="teacher_weights must be non-negative finite"):
        distiller([protonet, maml], teacher_weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="teacher_weights are all 0"):
        distiller([protonet, maml], teacher_weights=[0, 0])
    with pytest.raises(ValueError, match="teacher_weights has 2 entries for 1 teachers"):
        distiller(protonet, teacher_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="anchor_teacher must be the index of a teacher, 0 to 1"):
        distiller([protonet, maml], anchor_teacher=2)
    with pytest.raises(TypeError, match="teacher must be a Learner, .* non-empty list"):
        distiller([])
    with pytest.raises(TypeError, match="teacher must be a Learner, a MetaLearnerModule"):
        distiller([protonet, Conv4()])
    hints = FeatureHints(teacher_taps=[["features.1"], ["a"], ["b"]])
    with pytest.raises(ValueError, match="teacher_taps must be a list of module paths for every"):
        distiller([protonet, maml], terms=[TaskLoss(), hints])
    with pytest.raises(ValueError, match="temperatures list has 1 entries for 2 teacher"):
        distiller([protonet, maml], terms=[SoftLabels(teacher_temperatures=[2.0])])
    # θ* across algorithms: the MAML teacher's body for a ProtoNet student (its head dropped)
    across = distiller([protonet, maml], init_from_teacher=True, anchor_teacher=1)
    assert "head.weight" not in dict(across.student.model.named_parameters())
    with pytest.raises(
        ValueError, match=r"teacher 1 \(anchor_teacher=1\), a MAML VisionTransformer"
    ):
        distiller([protonet, teacher_of_vit()], init_from_teacher=True, anchor_teacher=1)
    distiller([protonet, maml], init_from_teacher=True, anchor_teacher=0)  # the one that fits
    five_way = MetaLearnerModule(Conv4(hidden=8, image_size=16), MAML(), ways=5)
    with pytest.raises(ValueError, match="teacher 1's MAML head is 5-way but this module trains"):
        distiller([protonet, five_way])


def test_per_teacher_feature_taps(episode):
    protonet, maml = teacher_of(ProtoNet()), teacher_of(MAML(inner_lr=0.5), seed=2)
    hints = FeatureHints(student_taps=["features.2"],
                         teacher_taps=[["features.1"], ["backbone.features.3"]])  # fmt: skip
    model = distiller([protonet, maml], terms=[TaskLoss(), hints])
    assert hints.student_paths() == ["features.2"]
    assert [hints.teacher_paths(k) for k in (0, 1)] == [["features.1"], ["backbone.features.3"]]
    assert projector(model, 0).kind == projector(model, 1).kind == "map"
    assert torch.isfinite(model.episode_loss(episode).terms["feature_hints"])


# -- the command -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_two_teacher_config_runs_through_metakd(tmp_path):
    """configs/kanji/distill_two_teachers.yaml, shrunk to tiny teachers and data, fits end to end."""
    paths = [
        save_teacher(tmp_path, ProtoNet(), "protonet.ckpt", seed=0, hidden=8, image_size=8),
        save_teacher(tmp_path, MAML(inner_lr=0.5), "maml.ckpt", seed=2, hidden=8, image_size=8),
    ]
    config = yaml.safe_load((ROOT / "configs/kanji/distill_two_teachers.yaml").read_text())
    assert len(config["model"]["init_args"]["teacher"]) == 2
    args = config["model"]["init_args"]
    args.update(teacher=paths, teacher_weights=[0.25, 0.75], ways=3)
    args["terms"].append(
        {"class_path": "lightning_metakd.distill.FeatureHints", "init_args": {"weight": 0.5}}
    )
    args["student_backbone"]["init_args"].update(hidden=4, image_size=8)
    config["data"] = {
        "class_path": "conftest.TinyDataModule",
        "init_args": dict(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=2,
                          val_episodes=2, test_episodes=2, image_size=8),
    }  # fmt: skip
    config["trainer"].update(max_epochs=1, enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / "two_teachers.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    fit = subprocess.run(
        [sys.executable, "-m", "lightning_metakd.cli", "fit", "--config", str(path)],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "runs" / "kanji-distill-two-teachers" / "version_0"
    resolved = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert resolved["teacher"] == paths and resolved["anchor_teacher"] == 0
    model = DistillationModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert model.num_teachers == 2 and model.teacher_weights == [0.25, 0.75]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert type(model.teachers[1].algorithm).__name__ == "MAML"
    assert projector(model, 1).teacher_dim == 8

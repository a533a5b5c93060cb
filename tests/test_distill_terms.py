"""Distillation terms as parts: a user's own term by class_path, what each term binds and needs."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import TinyDataModule, make_distiller

from lightning_metakd.algorithms import MAML, ProtoNet
from lightning_metakd.distill import (
    DistillationTerm,
    FeatureHints,
    ParameterAnchor,
    SoftLabels,
    TaskContext,
    TaskLoss,
    soft_label_loss,
)
from lightning_metakd.lightning_cli import legacy_terms_yaml, run_lightning_cli
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule
from lightning_metakd.spec import component_spec


class CosineEmbedding(DistillationTerm):
    """A term a user writes in their own project: 1 − cos between the query embeddings."""

    name = "cosine_embedding"

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        self._paths: list[str] = []

    def bind(self, student, teachers, theta_star) -> None:  # noqa: ANN001
        if any(t.backbone.num_features != student.backbone.num_features for t in teachers):
            raise ValueError("CosineEmbedding needs teachers of the student's embedding width.")

    def forward(self, ctx: TaskContext) -> torch.Tensor:
        s = ctx.student.model(ctx.query_x)
        values = [1 - torch.cosine_similarity(s, t.model(ctx.query_x), dim=-1).mean()
                  for t in ctx.teachers]  # fmt: skip
        return ctx.mix(values)


@pytest.fixture(scope="module")
def episode():
    dm = TinyDataModule(ways=3, shots=1, queries=3, meta_batch_size=2, image_size=16)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def teacher(algorithm=None, hidden: int = 8) -> MetaLearnerModule:
    torch.manual_seed(0)
    return MetaLearnerModule(Conv4(hidden=hidden, image_size=16), algorithm or ProtoNet(), ways=3)


def test_a_users_own_term_runs_from_yaml_by_class_path(tmp_path):
    path = tmp_path / "teacher.ckpt"
    torch.save({}, path)  # never read: the config is only built
    config = {
        "model": {
            "class_path": "lightning_metakd.modules.DistillationModule",
            "init_args": {
                "teacher": str(path),
                "student_backbone": {"class_path": "lightning_metakd.models.Conv4",
                                     "init_args": {"hidden": 8, "image_size": 16}},
                "student_algorithm": {"class_path": "lightning_metakd.algorithms.ProtoNet"},
                "ways": 3,
                "terms": [
                    {"class_path": "lightning_metakd.distill.TaskLoss"},
                    {"class_path": "test_distill_terms.CosineEmbedding",
                     "init_args": {"weight": 0.5}},
                ],
            },
        },
        "data": {"class_path": "conftest.TinyDataModule", "init_args": {"ways": 3}},
        "trainer": {"logger": False},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = run_lightning_cli(["--config", str(tmp_path / "config.yaml")], run=False)
    terms = list(cli.model.terms)
    assert [type(t).__name__ for t in terms] == ["TaskLoss", "CosineEmbedding"]
    assert terms[1].weight == 0.5


def test_a_users_term_adds_its_weighted_value_and_is_checkpointed(episode, tmp_path):
    model = make_distiller(teacher(), Conv4(hidden=8, image_size=16),
                           terms=[TaskLoss(), CosineEmbedding(weight=0.5)])  # fmt: skip
    out = model.episode_loss(episode)
    assert set(out.terms) == {"task", "cosine_embedding"}
    torch.testing.assert_close(out.loss, out.terms["task"] + out.terms["cosine_embedding"])
    assert out.terms["cosine_embedding"].item() > 0
    spec = component_spec(model.terms[1])
    assert spec == {"class_path": "test_distill_terms.CosineEmbedding",
                    "init_args": {"weight": 0.5, "name": "cosine_embedding"}}  # fmt: skip
    with pytest.raises(ValueError, match="needs teachers of the student's embedding width"):
        make_distiller(teacher(), terms=[TaskLoss(), CosineEmbedding()])  # Conv4-4 student


def test_teachers_run_only_for_terms_that_need_them(episode, monkeypatch):
    calls = []
    protonet = teacher()
    original = protonet.learner.algorithm.adapt
    monkeypatch.setattr(protonet.learner.algorithm, "adapt",
                        lambda *a, **k: calls.append(1) or original(*a, **k))  # fmt: skip
    anchored = make_distiller(protonet, Conv4(hidden=8, image_size=16), init_from_teacher=True,
                              terms=[TaskLoss(), ParameterAnchor(weight=0.1)])  # fmt: skip
    anchored.episode_loss(episode)
    assert calls == []  # the task loss and the anchor need no teacher forward pass
    make_distiller(protonet, terms=[TaskLoss(), SoftLabels()]).episode_loss(episode)
    assert len(calls) == episode.num_tasks


def test_per_teacher_temperatures_by_hand(episode):
    teachers = [teacher(), teacher(MAML(inner_lr=0.5))]
    term = SoftLabels(weight=1.0, temperature=2.0, teacher_temperatures=[1.0, 8.0])
    model = make_distiller(teachers, terms=[TaskLoss(), term], teacher_weights=[1.0, 1.0])
    out = model.episode_loss(episode)
    expected = []
    for t in range(episode.num_tasks):
        task = episode.task(t)
        z = [m.learner.evaluate(task).logits[0] for m in teachers]
        probs = 0.5 * torch.softmax(z[0] / 1.0, -1) + 0.5 * torch.softmax(z[1] / 8.0, -1)
        expected.append(soft_label_loss(out.logits[t], teacher_probs=probs, temperature=2.0))
    torch.testing.assert_close(out.terms["soft_labels"], torch.stack(expected).mean())


def test_hints_at_several_depths_pair_blocks_by_relative_depth():
    hints = FeatureHints(student_taps=["features.1", "features.3"])
    model = make_distiller(teacher(hidden=8), terms=[TaskLoss(), hints])
    assert hints.teacher_paths(0) == ["features.1", "features.3"]  # equal depths: the same blocks
    assert [(p.student_dim, p.teacher_dim) for p in hints.projectors[0]] == [(4, 8), (4, 8)]
    assert model.terms[1] is hints
    with pytest.raises(ValueError, match="as many teacher_taps as student_taps"):
        make_distiller(teacher(), terms=[TaskLoss(), FeatureHints(
            student_taps=["features.1", "features.3"], teacher_taps=["features.3"])])  # fmt: skip


def test_the_anchor_stores_theta_star_as_buffers(episode):
    model = make_distiller(teacher(), init_from_teacher=True,
                           terms=[TaskLoss(), ParameterAnchor(weight=2.0)])  # fmt: skip
    (anchor,) = [t for t in model.terms if isinstance(t, ParameterAnchor)]
    assert list(anchor.parameters()) == [] and all(not b.requires_grad for b in anchor.buffers())
    assert set(anchor.theta_star) == {n for n, _ in model.student.model.named_parameters()}
    with torch.no_grad():
        model.student.model.features[0][0].bias.add_(1.0)  # 4 entries, each 1 away from θ*
    out = model.episode_loss(episode)
    assert out.terms["anchor"].item() == pytest.approx(2.0 * 4)
    assert any(k.startswith("terms.1.store.") for k in model.state_dict())


def test_old_weight_arguments_map_to_the_new_terms():
    text = legacy_terms_yaml({"feature_weight": 0.5, "anchor_weight": 0.01, "temperature": 2.0})
    terms = yaml.safe_load(text)["terms"]
    assert [t["class_path"].rpartition(".")[2] for t in terms] == [
        "TaskLoss", "SoftLabels", "FeatureHints", "ParameterAnchor"
    ]  # fmt: skip
    assert terms[1]["init_args"] == {"weight": 1.0, "temperature": 2.0}
    assert legacy_terms_yaml({"soft_label_weight": 0.0})  # soft labels off: task loss alone
    assert yaml.safe_load(legacy_terms_yaml({"soft_label_weight": 0}))["terms"] == [
        {"class_path": "lightning_metakd.distill.TaskLoss", "init_args": {"weight": 1.0}}
    ]
    assert legacy_terms_yaml({"ways": 5}) is None
    assert math.isclose(terms[3]["init_args"]["weight"], 0.01)

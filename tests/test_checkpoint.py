"""The one checkpoint reader: kinds, clear errors, and checkpoints of lightning-metakd 0.1.

``tests/data/v0.1-*.ckpt`` were written by the 0.1 modules (commit e9111c8) on a tiny MAML Conv4-4
teacher and a Conv4-2 ProtoNet student distilled from a Conv4-4 ProtoNet teacher (8 px, 3-way);
``v0.1-expected.pt`` holds one test episode and the 0.1 learners' logits on it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TinyDataModule

from lightning_metakd.algorithms import MAML, Learner, ProtoNet
from lightning_metakd.data import Episode
from lightning_metakd.models import Conv4
from lightning_metakd.modules import (
    CheckpointError,
    DistillationModule,
    MetaLearnerModule,
    load_learner,
    load_module,
    read_checkpoint,
)
from lightning_metakd.report import checkpoint_learners

DATA = Path(__file__).parent / "data"
V1_MAML, V1_DISTILL = DATA / "v0.1-maml-conv4.ckpt", DATA / "v0.1-distill-protonet.ckpt"


@pytest.fixture(scope="module")
def expected():
    saved = torch.load(DATA / "v0.1-expected.pt", weights_only=True)
    return Episode(*saved["episode"]), saved


def trainer(tmp_path) -> L.Trainer:
    return L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     default_root_dir=tmp_path)  # fmt: skip


def save(module, tmp_path, name: str) -> Path:
    run = trainer(tmp_path)
    run.fit(module, TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, image_size=8))
    path = tmp_path / name
    run.save_checkpoint(path)
    return path


def test_kinds_and_learners_of_current_checkpoints(tmp_path):
    torch.manual_seed(0)
    teacher = MetaLearnerModule(Conv4(hidden=4, image_size=8), ProtoNet(), ways=3)
    path = save(teacher, tmp_path, "teacher.ckpt")
    checkpoint = read_checkpoint(path)
    assert (checkpoint.kind, checkpoint.version) == ("learner", 2)
    assert checkpoint.module_class == "lightning_metakd.modules.meta_learner.MetaLearnerModule"
    learner = load_learner(path)
    assert isinstance(learner, Learner) and not learner.training
    for name, value in teacher.learner.state_dict().items():
        assert torch.equal(learner.state_dict()[name], value), name
    distiller = DistillationModule(path, Conv4(hidden=2, image_size=8), ProtoNet(), ways=3)
    distilled = save(distiller, tmp_path, "distilled.ckpt")
    checkpoint = read_checkpoint(distilled)
    assert checkpoint.kind == "distillation"
    assert torch.equal(checkpoint.student().model.features[0][0].weight,
                       distiller.student.model.features[0][0].weight)  # fmt: skip
    (t,) = checkpoint.teachers()
    assert torch.equal(t.model.features[0][0].weight, learner.model.features[0][0].weight)
    assert type(load_module(distilled)) is DistillationModule
    assert load_learner(distilled).backbone.hidden == 2  # a distillation checkpoint: its student


def test_bad_files_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match=r"No checkpoint at .*missing\.ckpt; pass the best"):
        read_checkpoint(tmp_path / "missing.ckpt")
    torch.manual_seed(0)
    good = save(MetaLearnerModule(Conv4(hidden=4, image_size=8), ProtoNet(), 3), tmp_path, "a.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt is not a readable PyTorch "
                                              r"checkpoint \(truncated, or not a checkpoint"):  # fmt: skip
        read_checkpoint(truncated)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="foreign.ckpt is not a lightning-metakd checkpoint"):
        read_checkpoint(tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match=r"a MetaLearnerModule checkpoint, not a "
                                              r"DistillationModule one; test it with a config whose model is a MetaLearnerModule "
                                              r"\(e.g. configs/kanji/protonet.yaml\)"):  # fmt: skip
        DistillationModule.load_from_checkpoint(good)
    with pytest.raises(CheckpointError, match="has no student"):
        read_checkpoint(good).student()


def test_a_meta_learner_checkpoint_of_0_1_loads_and_predicts_as_it_did(expected):
    episode, saved = expected
    learner = load_learner(V1_MAML)
    assert isinstance(learner.algorithm, MAML) and learner.ways == 3
    torch.testing.assert_close(learner.evaluate(episode).logits, saved["maml_logits"])
    module = MetaLearnerModule.load_from_checkpoint(V1_MAML)  # upgraded in on_load_checkpoint
    torch.testing.assert_close(module.learner.evaluate(episode).logits, saved["maml_logits"])


def test_a_distillation_checkpoint_of_0_1_gives_its_learners_not_a_module(expected, tmp_path):
    episode, saved = expected
    checkpoint = read_checkpoint(V1_DISTILL)
    assert (checkpoint.kind, checkpoint.version) == ("distillation", 1)
    torch.testing.assert_close(
        checkpoint.student().evaluate(episode).logits, saved["student_logits"]
    )
    torch.testing.assert_close(
        checkpoint.teachers()[0].evaluate(episode).logits, saved["teacher_logits"]
    )
    assert list(checkpoint_learners(checkpoint)) == ["teacher", "distilled student"]
    with pytest.raises(CheckpointError, match="0.1, whose distillation terms were keyword"):
        load_module(V1_DISTILL)
    # A 0.1 teacher checkpoint still teaches a new DistillationModule.
    model = DistillationModule(str(V1_MAML), Conv4(hidden=2, image_size=8), MAML(inner_lr=0.3),
                               ways=3, init_from_teacher=True)  # fmt: skip
    assert torch.isfinite(model.episode_loss(episode).loss)

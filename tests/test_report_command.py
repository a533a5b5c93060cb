"""`metakd report`: trained checkpoints compared on the same fixed test episodes."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import yaml
from conftest import TinyDataModule

from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.cli import main
from lightning_metakd.distill import SoftLabels, TaskLoss
from lightning_metakd.models import Conv4
from lightning_metakd.modules import DistillationModule, MetaLearnerModule


def _save(module: L.LightningModule, path) -> str:
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, TinyDataModule(ways=3, shots=1, queries=2, image_size=16))
    trainer.save_checkpoint(path)
    return str(path)


def test_report_command_compares_teacher_student_and_baseline(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = MetaLearnerModule(Conv4(hidden=8, image_size=16), ProtoNet(), ways=3)
    teacher_ckpt = _save(teacher, tmp_path / "teacher.ckpt")
    distiller = DistillationModule(
        teacher_ckpt, Conv4(hidden=4, image_size=16), ProtoNet(), ways=3,
        terms=[TaskLoss(), SoftLabels(weight=1.0)],
    )  # fmt: skip
    distilled = _save(distiller, tmp_path / "distilled.ckpt")
    baseline = _save(
        MetaLearnerModule(Conv4(hidden=4, image_size=16), ProtoNet(), ways=3),
        tmp_path / "baseline.ckpt",
    )
    data = {
        "class_path": "conftest.TinyDataModule",
        "init_args": {"ways": 3, "shots": 1, "queries": 2, "image_size": 16, "test_episodes": 6},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    args = ["report", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "out"),
            "--repeats", "1", "--checkpoint", distilled,
            "--checkpoint", f"baseline student={baseline}",
            "--reference", "baseline student"]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "distilled student", "baseline student"]
    # Paired differences against the named reference (their mean is the difference of means).
    assert rows[2]["diff_vs_reference"] is None
    for row in rows[:2]:
        expected_diff = row["accuracy"] - rows[2]["accuracy"]
        assert row["diff_vs_reference"] == pytest.approx(expected_diff, abs=1e-6)
        assert row["diff_ci95"] >= 0
    assert rows[0]["parameters"] > rows[1]["parameters"] == rows[2]["parameters"]
    # The teacher row is the teacher's own test accuracy on these episodes.
    expected = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(
        MetaLearnerModule.load_from_checkpoint(teacher_ckpt),
        TinyDataModule(**data["init_args"]),
        verbose=False,
    )[0]["test/acc"]
    assert rows[0]["accuracy"] == pytest.approx(expected, abs=1e-6)
    out = capsys.readouterr().out
    assert "| teacher |" in out and "| Δ vs baseline student (points, paired) |" in out
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*args[:-1], "nobody"]) == 2
    assert "reference 'nobody' is not one of the learners" in capsys.readouterr().err


def test_report_command_errors_are_clear(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("trainer: {max_epochs: 1}\n")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert main(["report", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path),
                 "--checkpoint", str(tmp_path / "junk.ckpt")]) == 2  # fmt: skip
    assert "no `data:` section" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text(
        "data: {class_path: conftest.TinyDataModule, init_args: {ways: 3}}\n"
    )
    assert main(["report", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path),
                 "--checkpoint", str(tmp_path / "junk.ckpt")]) == 2  # fmt: skip
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err

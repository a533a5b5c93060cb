"""The comparison report: the same test episodes, exact sizes, FLOPs, and the three files."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import TinyDataModule

from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule
from lightning_metakd.report import ablation, compare


def conv4_parameters(hidden: int, in_channels: int = 1) -> int:
    """Conv (3x3, bias) + BatchNorm affine of four blocks."""
    first = hidden * in_channels * 9 + hidden + 2 * hidden
    rest = hidden * hidden * 9 + hidden + 2 * hidden
    return first + 3 * rest


def test_compare_writes_the_report_with_the_learners_own_numbers(tmp_path):
    dm = TinyDataModule(ways=3, shots=1, queries=3, meta_batch_size=4, val_episodes=4,
                        test_episodes=8, image_size=16)  # fmt: skip
    torch.manual_seed(0)
    learners = {
        "wide": MetaLearnerModule(Conv4(hidden=16, image_size=16), ProtoNet(), ways=3),
        "narrow": MetaLearnerModule(Conv4(hidden=4, image_size=16), ProtoNet(), ways=3),
    }
    rows = compare(learners, dm, tmp_path / "out", warmup=1, repeats=3)
    assert [r["name"] for r in rows] == ["wide", "narrow"]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    for row, learner in zip(rows, learners.values(), strict=True):
        own = trainer.test(learner, dm, verbose=False)[0]
        assert row["accuracy"] == pytest.approx(own["test/acc"], abs=1e-6)
        assert row["ci95"] == pytest.approx(own["test/acc_ci95"], abs=1e-6)
        assert row["latency_ms"] > 0
    assert rows[0]["parameters"] == conv4_parameters(16) == 7_248
    assert rows[1]["parameters"] == conv4_parameters(4) == 516
    assert rows[0]["flops"] > rows[1]["flops"] > 0

    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text()) == rows
    table = (out / "report.md").read_text().splitlines()
    assert table[0].startswith("| learner | accuracy (%)") and len(table) == 4
    assert f"| wide | {100 * rows[0]['accuracy']:.2f} ± " in table[2]
    assert "| 7,248 |" in table[2] and "| 516 |" in table[3]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_needs_meta_learners(tmp_path):
    with pytest.raises(TypeError, match="compare takes MetaLearnerModules"):
        compare({"x": torch.nn.Linear(2, 2)}, None, tmp_path)


def test_ablation_table():
    runs = {
        "task only": {"test/acc": 0.60, "test/acc_ci95": 0.02},
        "+ soft": {"test/acc": 0.65, "test/acc_ci95": 0.02},
        "all terms": {"test/acc": 0.7, "test/acc_ci95": 0.015},
    }
    lines = ablation(runs).splitlines()
    assert lines[0] == "| run | accuracy (%) | Δ vs task only (points) |"
    assert lines[2] == "| task only | 60.00 ± 2.00 | +0.00 |"
    assert lines[3] == "| + soft | 65.00 ± 2.00 | +5.00 |"
    assert lines[4] == "| all terms | 70.00 ± 1.50 | +10.00 |"
    assert "Δ vs + soft" in ablation(runs, baseline="+ soft")
    with pytest.raises(KeyError, match="no 'test/acc'"):
        ablation({"broken": {"val/acc": 0.5}})

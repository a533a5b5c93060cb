"""The comparison report: the same test episodes, exact sizes, FLOPs, and the three files."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import TinyDataModule

import lightning_metakd.report as report
from lightning_metakd.algorithms import Learner, ProtoNet
from lightning_metakd.evaluation import mean_ci95
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule
from lightning_metakd.report import ablation, compare, markdown_table


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
    rows = compare({n: m.learner for n, m in learners.items()}, dm, tmp_path / "out", warmup=1,
                   repeats=3)  # fmt: skip
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
    # The paired difference is over the per-episode accuracies of the same test episodes.
    dm.setup("test")
    episodes = [
        torch.cat([learner.learner.evaluate(batch).accuracy for batch in dm.test_dataloader()])
        for learner in learners.values()
    ]
    diff, diff_ci95 = mean_ci95(episodes[1] - episodes[0])
    assert rows[0]["diff_vs_reference"] is None and rows[0]["diff_ci95"] is None
    assert rows[1]["diff_vs_reference"] == pytest.approx(diff, abs=1e-6)
    assert rows[1]["diff_ci95"] == pytest.approx(diff_ci95, abs=1e-6)
    assert list(rows[0]) == list(report.COLUMNS)

    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text()) == rows
    table = (out / "report.md").read_text().splitlines()
    assert table[0].startswith(
        "| learner | normalization | accuracy (%) | Δ vs wide (points, paired) |"
    )
    assert "| wide | transductive |" in table[2]
    assert len(table) == 4 and "| — |" in table[2]
    assert f"| {100 * diff:+.2f} ± {100 * diff_ci95:.2f} |" in table[3]
    assert f"| wide | transductive | {100 * rows[0]['accuracy']:.2f} ± " in table[2]
    assert "| 7,248 |" in table[2] and "| 516 |" in table[3]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_known_accuracies_are_used_and_digests_say_when_they_apply(tmp_path):
    """compare() takes per-episode accuracies measured elsewhere (the pipeline measures two
    learners beside distillation) and gives the rows it would have measured; the digests that
    guard that reuse change with any weight and with the episodes, not with population
    statistics a transductive learner never reads."""
    import copy

    from lightning_metakd.report.comparison import (
        episode_accuracies,
        episodes_digest,
        learner_digest,
    )

    dm = TinyDataModule(ways=3, shots=1, queries=3, meta_batch_size=4, val_episodes=4,
                        test_episodes=8, image_size=16)  # fmt: skip
    torch.manual_seed(0)
    learners = {
        n: MetaLearnerModule(Conv4(hidden=h, image_size=16), ProtoNet(), ways=3).learner
        for n, h in (("wide", 16), ("narrow", 4))
    }
    plain = compare(learners, dm, tmp_path / "a", warmup=0, repeats=1, plot=False)
    fake = torch.linspace(0, 1, 8)
    reused = compare(learners, dm, tmp_path / "b", warmup=0, repeats=1, plot=False,
                     known_accuracies={"narrow": episode_accuracies(learners["narrow"], dm)})  # fmt: skip
    forced = compare(learners, dm, tmp_path / "c", warmup=0, repeats=1, plot=False,
                     known_accuracies={"narrow": fake})  # fmt: skip
    same = ("accuracy", "ci95", "diff_vs_reference", "diff_ci95", "parameters", "flops")
    assert [{k: r[k] for k in same} for r in reused] == [{k: r[k] for k in same} for r in plain]
    assert forced[1]["accuracy"] == pytest.approx(0.5)  # the given ones, not measured again
    assert forced[1]["diff_vs_reference"] == pytest.approx(0.5 - plain[0]["accuracy"])

    wide = learners["wide"]
    twin = copy.deepcopy(wide)
    assert learner_digest(twin) == learner_digest(wide)
    twin.register_buffer("calibrated", torch.tensor(True))  # unread by a transductive learner
    assert learner_digest(twin) == learner_digest(wide)
    with torch.no_grad():
        next(twin.model.parameters()).view(-1)[0] += 1e-6
    assert learner_digest(twin) != learner_digest(wide)
    assert learner_digest(learners["narrow"]) != learner_digest(wide)

    again = TinyDataModule(ways=3, shots=1, queries=3, meta_batch_size=4, val_episodes=4,
                           test_episodes=8, image_size=16)  # fmt: skip
    other = TinyDataModule(ways=3, shots=1, queries=3, meta_batch_size=4, val_episodes=4,
                           test_episodes=8, image_size=16, seed=1)  # fmt: skip
    assert episodes_digest(again) == episodes_digest(dm) != episodes_digest(other)


def test_compare_needs_meta_learners(tmp_path):
    with pytest.raises(TypeError, match="compare takes Learners"):
        compare({"x": torch.nn.Linear(2, 2)}, None, tmp_path)


def compare_given(accuracies: dict[str, list[float]], monkeypatch, tmp_path, **kwargs):
    """``compare`` on learners whose per-episode test accuracies are ``accuracies``."""
    learners = {name: Learner(Conv4(hidden=2), ProtoNet(), ways=2) for name in accuracies}

    def measure(learner, datamodule, warmup, repeats, episode_accuracy=None):
        name = next(n for n, m in learners.items() if m is learner)
        episode_accuracy = torch.tensor(accuracies[name])
        mean, ci95 = mean_ci95(episode_accuracy)
        return {"normalization": "transductive", "accuracy": mean, "ci95": ci95,
                "episode_accuracy": episode_accuracy,
                "parameters": 10, "flops": 1e6, "latency_ms": 1.0}  # fmt: skip

    monkeypatch.setattr(report.comparison, "measure", measure)
    rows = compare(learners, None, tmp_path, plot=False, **kwargs)
    return {r["name"]: r for r in rows}


def test_paired_difference_by_hand(monkeypatch, tmp_path):
    # Per-episode differences b − a = [0.1, 0.0, 0.2, 0.1]: mean 0.1, sample variance 0.02 / 3.
    a = [0.5, 0.6, 0.4, 0.7]
    rows = compare_given({"a": a, "b": [0.6, 0.6, 0.6, 0.8]}, monkeypatch, tmp_path)
    ci95 = 1.96 * (0.02 / 3) ** 0.5 / 4**0.5
    assert rows["a"]["diff_vs_reference"] is None and rows["a"]["diff_ci95"] is None
    assert rows["b"]["diff_vs_reference"] == pytest.approx(0.1, abs=1e-6)
    assert rows["b"]["diff_ci95"] == pytest.approx(ci95, abs=1e-6)
    # report.json holds the rows without the per-episode accuracies.
    assert json.loads((tmp_path / "report.json").read_text()) == list(rows.values())
    assert "episode_accuracy" not in (tmp_path / "report.json").read_text()


def test_paired_difference_is_significant_where_the_accuracy_cis_overlap(monkeypatch, tmp_path):
    # Episodes differ a lot in difficulty; b is better by about 0.05 on every one of them.
    a = [0.2, 0.9, 0.4, 0.7, 0.3, 0.8]
    b = [x + d for x, d in zip(a, [0.04, 0.06, 0.05, 0.05, 0.04, 0.06], strict=True)]
    rows = compare_given({"a": a, "b": b}, monkeypatch, tmp_path)
    ra, rb = rows["a"], rows["b"]
    assert rb["accuracy"] - rb["ci95"] < ra["accuracy"] + ra["ci95"]  # the CIs overlap
    assert rb["diff_vs_reference"] == pytest.approx(0.05, abs=1e-6)
    assert rb["diff_vs_reference"] - rb["diff_ci95"] > 0  # the paired CI excludes 0
    assert rb["diff_ci95"] < 0.01 < 0.2 < ra["ci95"]


def test_paired_difference_against_a_named_reference(monkeypatch, tmp_path):
    accuracies = {"a": [0.5, 0.6, 0.4, 0.7], "b": [0.6, 0.6, 0.6, 0.8], "c": [0.5, 0.5, 0.5, 0.5]}
    rows = compare_given(accuracies, monkeypatch, tmp_path, reference="b")
    assert rows["b"]["diff_vs_reference"] is None and rows["b"]["diff_ci95"] is None
    assert rows["a"]["diff_vs_reference"] == pytest.approx(-0.1, abs=1e-6)
    assert rows["a"]["diff_ci95"] == pytest.approx(1.96 * (0.02 / 3) ** 0.5 / 2, abs=1e-6)
    assert rows["c"]["diff_vs_reference"] == pytest.approx(-0.15, abs=1e-6)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert "| Δ vs b (points, paired) |" in lines[0]
    assert "| a | transductive | 55.00 ± " in lines[2] and "| -10.00 ± 8.00 |" in lines[2]
    assert "| b | transductive | 65.00 ± " in lines[3] and "| — |" in lines[3]
    # An unknown reference fails before anything is measured.
    learners = {name: Learner(Conv4(hidden=2), ProtoNet(), ways=2) for name in "abc"}
    monkeypatch.setattr(
        report.comparison, "measure", lambda *args: pytest.fail("measured before the check")
    )
    with pytest.raises(KeyError, match=r"reference 'd' is not one of the learners \['a', 'b', 'c'"):
        compare(learners, None, tmp_path, reference="d")


def test_markdown_table_paired_column():
    common = {"accuracy": 0.5, "ci95": 0.02, "parameters": 1_000, "flops": 2e6, "latency_ms": 1.5}
    rows = [
        {"name": "teacher", **common, "diff_vs_reference": None, "diff_ci95": None},
        {"name": "student", **common, "diff_vs_reference": 0.0035, "diff_ci95": 0.0021},
        {"name": "worse", **common, "diff_vs_reference": -0.0123, "diff_ci95": 0.004},
    ]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == ("| learner | normalization | accuracy (%) | Δ vs teacher (points, paired) "
                        "| parameters | MFLOPs / episode | CPU latency (ms) |")  # fmt: skip
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|"
    assert lines[2] == "| teacher | — | 50.00 ± 2.00 | — | 1,000 | 2.00 | 1.50 |"
    assert lines[3] == "| student | — | 50.00 ± 2.00 | +0.35 ± 0.21 | 1,000 | 2.00 | 1.50 |"
    assert lines[4] == "| worse | — | 50.00 ± 2.00 | -1.23 ± 0.40 | 1,000 | 2.00 | 1.50 |"
    # Rows of old callers, without the diff keys: the column is there, every cell "—".
    old = markdown_table([{"name": "x", **common}, {"name": "y", **common}]).splitlines()
    assert "| Δ vs x (points, paired) |" in old[0]
    assert old[3] == "| y | — | 50.00 ± 2.00 | — | 1,000 | 2.00 | 1.50 |"


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

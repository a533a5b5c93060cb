"""The models shipped in the package: their files, their stated accuracy, `pretrained:<name>`
wherever a checkpoint path goes, and `metakd pretrained` (issue #17, part 3)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.cli import main
from lightning_metakd.deploy.learner_export import default_output
from lightning_metakd.distill import SoftLabels, TaskLoss
from lightning_metakd.models import Conv4
from lightning_metakd.modules import (
    CheckpointError,
    DistillationModule,
    load_learner,
    read_checkpoint,
)
from lightning_metakd.pretrained import models, weights_file
from lightning_metakd.report import measure, report_datamodule

ROOT = Path(__file__).resolve().parents[1]
MODELS = models()
TEACHER, STUDENT = "kanji-protonet-conv4-64", "kanji-student-conv4-16"
HW_TEACHER, HW_STUDENT = "kanji-handwriting-protonet-conv4-64", "kanji-handwriting-student-conv4-16"
MIXED_TEACHER, MIXED_STUDENT = "kanji-mixed-protonet-conv4-64", "kanji-mixed-student-conv4-24"
SCAN_TEACHER, SCAN_STUDENT = "kanji-scan-protonet-conv4-64", "kanji-scan-student-conv4-24"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_package_ships_a_teacher_and_its_student_per_recipe():
    assert list(MODELS) == [TEACHER, STUDENT, HW_TEACHER, HW_STUDENT, MIXED_TEACHER, MIXED_STUDENT,
                            SCAN_TEACHER, SCAN_STUDENT]  # fmt: skip
    assert [MODELS[n]["kind"] for n in MODELS] == ["teacher", "student"] * 4
    recipes = ["classic"] * 2 + ["handwriting"] * 2 + ["mixed"] * 2 + ["scan"] * 2
    assert [MODELS[n]["recipe"] for n in MODELS] == recipes
    styles = ["classic"] * 2 + ["handwriting"] * 2 + ["mixed"] * 4  # the scan pair: mixed renders
    assert [MODELS[n]["render_style"] for n in MODELS] == styles
    assert MODELS[STUDENT]["distilled_from"] == TEACHER
    assert MODELS[HW_STUDENT]["distilled_from"] == HW_TEACHER
    assert MODELS[MIXED_STUDENT]["distilled_from"] == MIXED_TEACHER
    assert MODELS[SCAN_STUDENT]["distilled_from"] == SCAN_TEACHER
    # the mixed and scan students are Conv4-24s (their own recipe), the other students Conv4-16
    students = (STUDENT, HW_STUDENT, MIXED_STUDENT, SCAN_STUDENT)
    assert [MODELS[n]["parameters"] for n in students] == [7248, 7248, 16056, 16056]
    for name in (MIXED_STUDENT, SCAN_STUDENT):
        assert "distill_protonet_handwriting.yaml" in MODELS[name]["trained"]["command"]
    # the scan teacher alone among the teachers trained on coarse-scan views, with 400 glyphs
    scans = "RandomLowResolution(probability=0.5, sizes=[8, 16])"
    assert [n for n in MODELS if MODELS[n]["views"] == scans] == [
        MIXED_STUDENT,
        SCAN_TEACHER,
        SCAN_STUDENT,
    ]
    assert "--data.init_args.train_transform" in MODELS[SCAN_TEACHER]["trained"]["command"]
    assert {MODELS[n]["synthetic_characters"] for n in (SCAN_TEACHER, SCAN_STUDENT)} == {400}
    assert {MODELS[n]["seed"] for n in MODELS} == {0}  # seed 0 of each, chosen before training


@pytest.mark.parametrize("name", list(MODELS))
def test_shipped_files_load_with_weights_only_and_match_the_manifest(name):
    entry, file = MODELS[name], weights_file(name)
    raw = torch.load(file, map_location="cpu", weights_only=True)
    assert file.stat().st_size == entry["bytes"]
    assert hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]
    # Stripped: the learner alone (a student without its teacher's weights), no training state.
    assert not {"optimizer_states", "lr_schedulers", "loops", "callbacks"} & set(raw)
    assert all(k.startswith("learner.") for k in raw["state_dict"])
    learner = load_learner(f"pretrained:{name}")
    assert sum(p.numel() for p in learner.model.parameters()) == entry["parameters"]
    assert learner.normalization == entry["normalization"]
    assert learner.components() == entry["components"]
    assert sum(e["bytes"] for e in MODELS.values()) < 3 * 2**20


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_reproduces_its_check_accuracy(name):
    """A regression check, not a benchmark: the manifest's ``check_accuracy`` was computed once
    with the shipped file, on fixed KanjiVG test episodes the manifest describes (seeded, so the
    same everywhere). Equality to 1e-6 catches any change to the weights, the reader, the
    backbone, the algorithm, the renders or the episode sampler that alters what the shipped
    model answers; the bound against chance says the number is still that of a trained model."""
    check = MODELS[name]["check_accuracy"]
    datamodule = report_datamodule(check["data"])
    datamodule.prepare_data()
    found = measure(load_learner(f"pretrained:{name}"), datamodule, warmup=0, repeats=1)
    assert datamodule.test_episodes == check["episodes"]
    assert found["accuracy"] == pytest.approx(check["accuracy"], abs=1e-6)
    chance = 1 / check["data"]["init_args"]["test_ways"]
    assert found["accuracy"] > 0.9 > 4 * chance


def test_pretrained_names_resolve_in_the_one_reader():
    checkpoint = read_checkpoint(f"pretrained:{STUDENT}")
    assert checkpoint.path == weights_file(STUDENT) and checkpoint.label == STUDENT
    assert checkpoint.kind == "learner"
    assert default_output(f"pretrained:{STUDENT}") == Path("runs/pretrained") / STUDENT / "export"


def test_an_unknown_name_lists_the_known_ones(capsys):
    known = ", ".join(f"pretrained:{n}" for n in MODELS)
    with pytest.raises(CheckpointError, match=f"Unknown pretrained model 'nope'; .*: {known}"):
        load_learner("pretrained:nope")
    assert main(["export", "--learner", "pretrained:nope"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metakd export: error: Unknown pretrained")
    assert known in lines[0]


def test_a_shipped_teacher_distils_a_student():
    student = DistillationModule(
        teacher=f"pretrained:{TEACHER}",
        student_backbone=Conv4(in_channels=1, hidden=16, image_size=28),
        student_algorithm=ProtoNet(),
        ways=20,
        terms=[TaskLoss(), SoftLabels(temperature=4.0)],
        init_from_teacher=True,
    )
    student.prepare()
    shipped = load_learner(f"pretrained:{TEACHER}").state_dict()
    taught = student.teachers[0].state_dict()
    assert shipped.keys() == taught.keys()
    assert all(torch.equal(shipped[k], taught[k]) for k in shipped)
    with pytest.raises(FileNotFoundError, match="No teacher checkpoint at .*pretrained:kanji"):
        DistillationModule(f"{ROOT}/missing.ckpt", Conv4(hidden=4), ProtoNet()).prepare()


def write_strokes(root: Path, per_class: int = 4) -> Path:
    """Three classes of white strokes on black, 28 px: a bar, a column, a diagonal."""
    rng = np.random.default_rng(0)
    for name in ("bar", "column", "diagonal"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.zeros((28, 28), np.uint8)
            at = 10 + int(rng.integers(0, 8))
            if name == "bar":
                pixels[at : at + 3, 5:23] = 255
            elif name == "column":
                pixels[5:23, at : at + 3] = 255
            else:
                for k in range(4, 24):
                    pixels[k, max(0, k - 2 + at - 14) : k + 1 + at - 14] = 255
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    return root


def test_metakd_finetune_adapts_the_shipped_student(tmp_path, capsys):
    root = write_strokes(tmp_path / "mine")
    args = ["finetune", "--checkpoint", f"pretrained:{STUDENT}", "--data_root", str(root),
            "--holdout", "1", "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert report["holdout_images"] == 3
    assert report["holdout_accuracy"] >= 2 / 3, capsys.readouterr().out


def test_metakd_pretrained_lists_every_model(capsys):
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| pretrained:")]
    assert [row.split(" | ")[0] for row in rows] == [f"| pretrained:{n}" for n in MODELS]
    for row, entry in zip(rows, MODELS.values(), strict=True):
        assert f"{entry['parameters']:,}" in row and entry["normalization"] in row
        simple, glyphs = entry["simple_characters"], entry["synthetic_characters"]
        extra = f" + simple characters (≤ {simple} strokes)" if simple else ""
        extra += f" + {glyphs} synthetic glyphs" if glyphs else ""
        extra += ", coarse-scan views" if entry["views"].startswith("RandomLowResolution(") else ""
        assert f"| KanjiVG, {entry['render_style']} renders{extra} |" in row
        assert bool(simple) == (entry["render_style"] == "mixed")  # the mixed pairs learn them
        assert bool(glyphs) == (entry["recipe"] == "scan")
        assert f"{100 * entry['accuracy']['kanji']['acc']:.2f}%" in row
        assert f"{entry['bytes'] / 1024:.0f} kB" in row
    assert main(["pretrained", "--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == list(MODELS)


def test_metakd_pretrained_does_not_import_torch():
    probe = (
        "import sys; from lightning_metakd.cli import main; code = main(['pretrained']); "
        "print('TORCH', code, any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "TORCH 0 False"


def test_metakd_test_runs_a_shipped_student_on_the_check_episodes(tmp_path, capsys):
    """``--ckpt_path pretrained:<name>`` through LightningCLI gives the manifest's number."""
    check = MODELS[STUDENT]["check_accuracy"]
    args = ["test", "--config", str(ROOT / "configs/kanji/protonet_conv4_16.yaml"),
            "--ckpt_path", f"pretrained:{STUDENT}",
            "--data.init_args.test_episodes", str(check["episodes"]),
            "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    row = next(line.replace("│", " ").split() for line in out.splitlines() if "test/acc " in line)
    assert float(row[-1]) == pytest.approx(check["accuracy"], abs=1e-6)
    capsys.readouterr()
    assert main([*args[:3], "--ckpt_path", "pretrained:nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metakd test: error: Unknown pretrained model 'nope'")
    assert err.count("\n") == 1
    assert main(["fit", *args[1:5]]) == 2
    assert "a shipped model holds no training state to resume" in capsys.readouterr().err

"""Target-task fine-tuning: FixedClassifier, finetune, the held-out split, `metakd finetune`, the
pipeline's optional finetune stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TinyDataModule
from PIL import Image

from lightning_metakd import pipeline
from lightning_metakd.algorithms import ANIL, MAML, Learner, MatchingNet, MetaSGD, ProtoNet
from lightning_metakd.deploy import (
    FinetuneError,
    FixedClassifier,
    finetune,
    holdout_split,
    load_learner,
    read_class_folders,
    run_finetune,
)
from lightning_metakd.deploy.finetune import finetune_main, input_format
from lightning_metakd.models import Conv4
from lightning_metakd.modules import DistillationModule, MetaLearnerModule
from lightning_metakd.pipeline import (
    PipelineConfigError,
    load_pipeline_config,
    read_marker,
    run_pipeline,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "kanji" / "quickstart"
SIZE = 16


def learner(algorithm, ways: int = 3, seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    return Learner(Conv4(hidden=8, image_size=SIZE), algorithm, ways=ways)


def labelled(counts=(2, 3, 1), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of len(counts) classes, a class template under noise; counts[k] images of class k."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(len(counts), 1, 4, 4, generator=g), size=(SIZE, SIZE))
    labels = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    images = 0.6 * templates[labels] + 0.4 * torch.rand(len(labels), 1, SIZE, SIZE, generator=g)
    return images, labels


ALGORITHMS = {
    "MAML": lambda: MAML(inner_lr=0.5, inner_steps=1, inner_steps_test=3),
    "ANIL": lambda: ANIL(inner_lr=0.5, inner_steps_test=2),
    "MetaSGD": lambda: MetaSGD(inner_lr=0.3, inner_steps_test=2),
    "ProtoNet": ProtoNet,
    "ProtoNet-cosine": lambda: ProtoNet(distance="cosine"),
    "MatchingNet": lambda: MatchingNet(temperature=0.5),
}


# -- FixedClassifier ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_fixed_classifier_logits_equal_the_adapted_learner(name):
    model = learner(ALGORITHMS[name]())
    support_x, support_y = labelled((2, 3, 1))
    query_x, _ = labelled((3, 2, 2), seed=1)
    expected = model.predict(model.adapt(support_x, support_y, "transductive"), query_x)
    classifier = FixedClassifier.from_learner(model, support_x, support_y, ["a", "b", "c"])
    with torch.no_grad():
        got = classifier(query_x)
    assert got.shape == (7, 3) and classifier.statistics == "batch"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # Control: the folded state matters — the un-adapted network scores differently.
    if model.algorithm.needs_head:
        unadapted = model.model(query_x)
        assert (unadapted - expected).abs().max() > 1e-3
    fresh = learner(ALGORITHMS[name]()).theta_star()  # the same seed: the learner is untouched
    assert all(torch.equal(fresh[k], v) for k, v in model.theta_star().items())


def test_fixed_statistics_equal_batch_statistics_on_their_images_and_are_per_image():
    model = learner(ProtoNet())
    support_x, support_y = labelled((3, 3, 3))
    query_x, _ = labelled((2, 2, 2), seed=1)
    classifier = FixedClassifier.from_learner(model, support_x, support_y, ["a", "b", "c"])
    with torch.no_grad():
        batch_on_support = classifier(support_x)
        batch_first = classifier(query_x[:1])
        batch_all = classifier(query_x)
    assert (batch_first - batch_all[:1]).abs().max() > 1e-3  # control: batch-dependent
    classifier.fix_statistics(support_x)
    classifier.train()  # frozen statistics stay frozen in train mode
    with torch.no_grad():
        torch.testing.assert_close(classifier(support_x), batch_on_support, rtol=1e-5, atol=1e-5)
        one, all_ = classifier(query_x[:1]), classifier(query_x)
    torch.testing.assert_close(one, all_[:1], rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="already fixed"):
        classifier.fix_statistics(support_x)


@pytest.mark.parametrize("name", ["MAML", "ProtoNet", "MatchingNet"])
@pytest.mark.parametrize("fixed", [False, True], ids=["batch", "fixed"])
def test_save_and_load_round_trip_with_weights_only(tmp_path, name, fixed):
    model = learner(ALGORITHMS[name]())
    support_x, support_y = labelled((2, 2, 2))
    classifier = FixedClassifier.from_learner(
        model, support_x, support_y, ["一", "二", "三"], invert=True
    )
    if fixed:
        classifier.fix_statistics(support_x)
    path = classifier.save(tmp_path / "out" / "classifier.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["class_names"] == ["一", "二", "三"] and raw["image_size"] == SIZE
    assert raw["channels"] == 1 and raw["invert"] is True
    assert raw["statistics"] == ("fixed" if fixed else "batch")
    loaded = FixedClassifier.load(path)
    assert not loaded.training and loaded.statistics == classifier.statistics
    assert (loaded.class_names, loaded.image_size, loaded.channels, loaded.invert) == (
        ["一", "二", "三"], SIZE, 1, True,
    )  # fmt: skip
    query_x, _ = labelled((2, 1, 3), seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(query_x), classifier(query_x))


def test_classifier_errors_are_clear(tmp_path):
    model = learner(MAML(inner_lr=0.5))
    support_x, support_y = labelled((2, 2, 2, 2))
    with pytest.raises(ValueError, match="3-way head.*4 were given"):
        FixedClassifier.from_learner(model, support_x, support_y, list("abcd"))
    x, y = labelled((2, 2, 2))
    with pytest.raises(ValueError, match="classes without an image: \\['d'\\]"):
        FixedClassifier.from_learner(learner(ProtoNet()), x, y, list("abcd"))
    classifier = FixedClassifier.from_learner(model, x, y, list("abc"))
    with pytest.raises(ValueError, match=r"takes images \[B, 1, 16, 16\]"):
        classifier(torch.zeros(2, 3, 16, 16))
    with pytest.raises(FileNotFoundError, match="No classifier at"):
        FixedClassifier.load(tmp_path / "missing.pt")
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "learner.ckpt")
    with pytest.raises(ValueError, match="training checkpoint: make a classifier"):
        FixedClassifier.load(tmp_path / "learner.ckpt")


# -- fine-tuning ----------------------------------------------------------------------------------
def test_finetuning_lowers_the_loss_and_the_anchor_keeps_theta_near_theta_star():
    images, labels = labelled((4, 4, 4))
    names = ["a", "b", "c"]
    runs = {}
    for weight in (0.0, 1.0):
        history = []
        classifier = finetune(
            learner(ProtoNet()), images, labels, names, epochs=25, lr=0.01,
            anchor_weight=weight, statistics="batch", progress=history.append,
        )  # fmt: skip
        runs[weight] = classifier, history
    adapted = finetune(learner(ProtoNet()), images, labels, names, statistics="batch")

    def train_loss(classifier):
        with torch.no_grad():
            return F.cross_entropy(classifier(images), labels).item()

    free, anchored = runs[0.0][1], runs[1.0][1]
    assert len(free) == 25 and free[-1].epochs == 25
    assert free[-1].task_loss < 0.5 * free[0].task_loss
    assert train_loss(runs[0.0][0]) < 0.5 * train_loss(adapted)
    assert anchored[-1].loss < anchored[0].loss and anchored[-1].anchor_loss > 0
    assert free[-1].anchor_loss == 0.0
    # The anchor keeps θ closer to θ*: ‖θ − θ*‖² after 25 epochs, with and without it.
    assert anchored[-1].anchor_distance < 0.5 * free[-1].anchor_distance
    assert free[0].anchor_distance > 0


def test_finetuning_maml_folds_adapted_weights_then_trains_them():
    images, labels = labelled((3, 3, 3))
    model = learner(MAML(inner_lr=0.5, inner_steps_test=2))
    history = []
    classifier = finetune(model, images, labels, list("abc"), epochs=5, lr=0.01,
                          optimizer="sgd", anchor_weight=0.1, progress=history.append)  # fmt: skip
    assert classifier.statistics == "fixed" and not classifier.training
    assert history[-1].task_loss < history[0].task_loss
    assert set(dict(classifier.network.named_parameters())) == set(model.theta_star())


def test_finetune_checks_its_input():
    images, labels = labelled((2, 2, 2))
    model = learner(ProtoNet())
    with pytest.raises(FinetuneError, match=r"takes images \[M, 1, 16, 16\]"):
        finetune(model, F.interpolate(images, size=(28, 28)), labels, list("abc"))
    with pytest.raises(FinetuneError, match="statistics must be one of"):
        finetune(model, images, labels, list("abc"), statistics="running")
    with pytest.raises(FinetuneError, match="batch_size must be at least 2"):
        finetune(model, images, labels, list("abc"), epochs=1, batch_size=1)
    with pytest.raises(FinetuneError, match="image_size=84 does not match"):
        input_format(model, image_size=84)
    with pytest.raises(FinetuneError, match="channels=3 does not match"):
        input_format(model, channels=3)
    assert input_format(model) == (SIZE, 1)


# -- the held-out split ---------------------------------------------------------------------------
def test_holdout_split_is_disjoint_per_class_and_seeded():
    labels = [0] * 5 + [1] * 4 + [2] * 3
    names = ["a", "b", "c"]
    train, held = holdout_split(labels, names, 0.4, seed=3)
    assert sorted(train + held) == list(range(12)) and not set(train) & set(held)
    assert [sum(labels[i] == k for i in held) for k in range(3)] == [2, 2, 1]  # round(0.4 n), ≥1
    assert holdout_split(labels, names, 0.4, seed=3) == (train, held)
    others = {tuple(holdout_split(labels, names, 0.4, seed=s)[1]) for s in range(8)}
    assert len(others) > 1  # control: the seed matters
    train, held = holdout_split(labels, names, 2, seed=0)
    assert [sum(labels[i] == k for i in held) for k in range(3)] == [2, 2, 2]
    assert holdout_split(labels, names, 0, seed=0) == (list(range(12)), [])
    # A class's held-out images do not depend on the other classes.
    alone = holdout_split([0, 0, 0], ["c"], 1, seed=5)[1]
    with_others = holdout_split([1] * 4 + [0, 0, 0], ["c", "b"], 1, seed=5)[1]
    assert [i + 4 for i in alone] == [i for i in with_others if i >= 4]


@pytest.mark.parametrize(
    ("holdout", "message"),
    [(3, "class 'c' has 3 image\\(s\\); holding out 3 leaves none"), (1.0, "fraction in \\[0, 1\\)"),
     (-1, "non-negative count"), (True, "fraction")],
)  # fmt: skip
def test_holdout_errors_are_clear(holdout, message):
    with pytest.raises(FinetuneError, match=message):
        holdout_split([0] * 5 + [1] * 4 + [2] * 3, ["a", "b", "c"], holdout)


# -- checkpoints and folders ----------------------------------------------------------------------
def _trainer(tmp_path) -> L.Trainer:
    return L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip


def _data() -> TinyDataModule:
    return TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=1,
                          val_episodes=2, test_episodes=2, image_size=SIZE)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A trained-for-one-step ProtoNet learner checkpoint and a distilled one (student Conv4-4)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    teacher = MetaLearnerModule(Conv4(hidden=8, image_size=SIZE), ProtoNet(), ways=3)
    t = _trainer(folder)
    t.fit(teacher, _data())
    t.save_checkpoint(folder / "learner.ckpt")
    torch.manual_seed(1)
    distiller = DistillationModule(teacher, Conv4(hidden=4, image_size=SIZE), ProtoNet(), ways=3)
    t = _trainer(folder)
    t.fit(distiller, _data())
    t.save_checkpoint(folder / "distilled.ckpt")
    return {"learner": folder / "learner.ckpt", "distilled": folder / "distilled.ckpt"}


def test_load_learner_takes_learners_and_distilled_students(checkpoints, tmp_path):
    plain = load_learner(checkpoints["learner"])
    assert isinstance(plain, Learner) and plain.backbone.hidden == 8
    student = load_learner(checkpoints["distilled"])
    assert isinstance(student, Learner) and student.backbone.hidden == 4
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(FinetuneError, match="not a lightning-metakd checkpoint"):
        load_learner(tmp_path / "other.ckpt")
    x, y = labelled((2, 2, 2))
    FixedClassifier.from_learner(plain, x, y, list("abc")).save(tmp_path / "classifier.pt")
    with pytest.raises(FinetuneError, match="a FixedClassifier file"):
        load_learner(tmp_path / "classifier.pt")
    with pytest.raises(FinetuneError, match="No checkpoint at"):
        load_learner(tmp_path / "missing.ckpt")


def write_folder(root: Path, counts=(4, 4, 4), size: int = 20, seed: int = 0) -> Path:
    """PNG class folders (grey, ``size`` px: the reader resizes them to the backbone's 16)."""
    images, labels = labelled(counts, seed)
    images = F.interpolate(images, size=(size, size), mode="bilinear")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"class_{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
    return root


def test_read_class_folders(tmp_path):
    data = read_class_folders(write_folder(tmp_path / "mine", (2, 3, 1)), SIZE, 1)
    assert data.images.shape == (6, 1, SIZE, SIZE) and data.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert data.class_names == ["class_0", "class_1", "class_2"]
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    inverted = read_class_folders(tmp_path / "mine", SIZE, 1, invert=True)
    torch.testing.assert_close(inverted.images, 1 - data.images)
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "one" / "only" / "a.png")
    with pytest.raises(FinetuneError, match="at least 2 class folders"):
        read_class_folders(tmp_path / "one", SIZE, 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_class_folders(tmp_path / "nowhere", SIZE, 1)


def test_finetune_main_writes_classifier_and_report(checkpoints, tmp_path, capsys):
    root = write_folder(tmp_path / "mine", (4, 4, 4))
    args = ["--checkpoint", str(checkpoints["distilled"]), "--data_root", str(root),
            "--holdout", "1", "--epochs", "3", "--anchor_weight", "0.1",
            "--output", str(tmp_path / "out")]  # fmt: skip
    assert finetune_main(args) == 0
    out = capsys.readouterr().out
    assert "3 classes, 12 images" in out and "9 to adapt on, 3 held out" in out
    assert "epoch 3/3: loss" in out and "fine-tuned: held-out accuracy" in out
    report = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert report["holdout_images"] == 3 and report["train_images"] == 9
    assert report["finetuned"]["images"] == 3 and len(report["history"]) == 3
    assert report["holdout_accuracy"] == report["finetuned"]["accuracy"]
    classifier = FixedClassifier.load(tmp_path / "out" / "classifier.pt")
    assert classifier.class_names == ["class_0", "class_1", "class_2"]
    # The report's accuracy is the saved classifier's on the held-out files.
    files = report["holdout_files"]
    with torch.no_grad():
        predicted = classifier(classifier.read_images(files)).argmax(-1)
    truth = torch.tensor([classifier.class_names.index(Path(f).parent.name) for f in files])
    assert (predicted == truth).sum().item() == report["finetuned"]["correct"]

    assert finetune_main([*args[:4], "--holdout", "4"]) == 2
    assert "class 'class_0' has 4 image(s); holding out 4" in capsys.readouterr().err
    assert finetune_main(["--checkpoint", str(root), "--data_root", str(root)]) == 2
    assert "No checkpoint at" in capsys.readouterr().err


@pytest.mark.slow
def test_metakd_finetune_command_reads_a_yaml_config(checkpoints, tmp_path):
    root = write_folder(tmp_path / "mine", (3, 3))
    config = {"checkpoint": str(checkpoints["learner"]), "data_root": str(root),
              "holdout": 0.34, "output": str(tmp_path / "out"), "statistics": "fixed"}  # fmt: skip
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lightning_metakd.cli", "finetune", "--config",
         str(tmp_path / "finetune.yaml"), "--seed", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 classes, 6 images" in done.stdout and "adapted: held-out accuracy" in done.stdout
    report = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert report["seed"] == 1 and report["holdout_images"] == 2 and "finetuned" not in report
    assert FixedClassifier.load(tmp_path / "out" / "classifier.pt").statistics == "fixed"


def test_mean_and_std_are_recorded_and_applied_when_reading_files(checkpoints, tmp_path):
    root = write_folder(tmp_path / "mine", (3, 3))
    plain = run_finetune(str(checkpoints["learner"]), str(root), str(tmp_path / "a"), holdout=1,
                         echo=lambda line: None)  # fmt: skip
    normalised = run_finetune(str(checkpoints["learner"]), str(root), str(tmp_path / "b"),
                              holdout=1, mean=[0.5], std=[0.25], echo=lambda line: None)  # fmt: skip
    a, b = (FixedClassifier.load(r["classifier"]) for r in (plain, normalised))
    assert (a.mean, a.std, b.mean, b.std) == (None, None, [0.5], [0.25])
    files = plain["holdout_files"]
    torch.testing.assert_close(b.read_images(files), (a.read_images(files) - 0.5) / 0.25)
    with pytest.raises(FinetuneError, match="give both mean and std, 1 values each"):
        run_finetune(str(checkpoints["learner"]), str(root), str(tmp_path / "c"), mean=[0.5])


def test_the_kanji_finetune_config_parses():
    from lightning_metakd.deploy.finetune import finetune_parser

    config = finetune_parser().parse_args(
        ["--config", str(ROOT / "configs" / "kanji" / "finetune.yaml")]
    )
    assert config.epochs > 0 and config.anchor_weight > 0 and config.data_root


# -- the pipeline's optional finetune stage -------------------------------------------------------
@pytest.fixture
def pipeline_with_finetune(monkeypatch, tmp_path, checkpoints):
    """Training and report stages faked (distill 'writes' the distilled checkpoint); finetune real."""
    calls: list[str] = []

    def train(stage, config, stage_dir, test=True):
        calls.append(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        return {"checkpoint": str(checkpoints["distilled"]), "test": {"test/acc": 0.5}}

    def report(spec, markers):
        calls.append("report")
        return {}

    monkeypatch.setattr(pipeline.stages, "run_training_stage", train)
    monkeypatch.setattr(pipeline.stages, "run_report_stage", report)
    root = write_folder(tmp_path / "mine", (3, 3, 3))
    config = {
        "name": "with-finetune",
        "teacher": str(QUICKSTART / "teacher.yaml"),
        "student_baseline": str(QUICKSTART / "student_baseline.yaml"),
        "distill": str(QUICKSTART / "distill.yaml"),
        "finetune": {"data_root": str(root), "holdout": 1, "epochs": 2, "anchor_weight": 0.1},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return calls, path, tmp_path / "run", root


def _run(path, run_dir, **kwargs):
    lines: list[str] = []
    run_pipeline(load_pipeline_config(path, run_dir), echo=lines.append, **kwargs)
    return "\n".join(lines)


def test_pipeline_finetune_stage_runs_then_skips(pipeline_with_finetune):
    calls, path, run_dir, root = pipeline_with_finetune
    out = _run(path, run_dir)
    assert calls == ["teacher", "student_baseline", "distill", "report"]
    assert "[pipeline] stage 4/5: finetune (new)" in out
    assert "[pipeline] stage 5/5: report (new)" in out
    marker = read_marker(run_dir, "finetune")
    assert marker["depends_on"] == {"distill": read_marker(run_dir, "distill")["run_id"]}
    assert marker["holdout_images"] == 3 and 0.0 <= marker["holdout_accuracy"] <= 1.0
    assert FixedClassifier.load(run_dir / "finetune" / "classifier.pt").class_names == [
        "class_0", "class_1", "class_2"
    ]  # fmt: skip
    assert "finetune done in" in out and "held-out accuracy" in out

    calls.clear()
    out = _run(path, run_dir)
    assert calls == [] and "stage 4/5: finetune skipped (finished; done.json)" in out

    (run_dir / "distill" / "done.json").unlink()
    out = _run(path, run_dir)
    assert "finetune (distill ran again)" in out

    # New images in the user's folder: the finetune stage alone runs again.
    write_folder(root, (4, 3, 3), seed=3)
    calls.clear()
    out = _run(path, run_dir)
    assert calls == [] and "finetune (its config changed)" in out


def test_pipeline_without_finetune_section_has_four_stages(tmp_path):
    spec = load_pipeline_config(ROOT / "configs" / "kanji" / "pipeline.yaml", tmp_path)
    assert spec.finetune is None
    assert pipeline.pipeline_stages(spec) == ("teacher", "student_baseline", "distill", "report")


@pytest.mark.parametrize(
    ("section", "message"),
    [({"holdout": 1}, "needs a data_root"), ({"data_root": "x", "lr_typo": 1}, "unknown key"),
     ({"data_root": "x", "checkpoint": "a.ckpt"}, "unknown key"), ("x", "must be a mapping"),
     ({"data_root": "/no/such/folder"}, "does not exist")],
)  # fmt: skip
def test_bad_finetune_sections_are_clear_errors(tmp_path, section, message):
    config = {"name": "x", "teacher": str(QUICKSTART / "teacher.yaml"),
              "student_baseline": str(QUICKSTART / "student_baseline.yaml"),
              "distill": str(QUICKSTART / "distill.yaml"), "finetune": section}  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(PipelineConfigError, match=message):
        load_pipeline_config(path)

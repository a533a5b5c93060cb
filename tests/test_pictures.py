"""The pictures a user looks at: the prediction sheet of finetune/classify and report.png."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TinyDataModule
from PIL import Image

from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.callbacks.tensorboard import WRONG
from lightning_metakd.deploy import FixedClassifier, export_classifier, run_finetune
from lightning_metakd.deploy.finetune import holdout_sheet, probabilities, read_class_folders
from lightning_metakd.deploy.sheet import SHEET_FILE, prediction_sheet, thumbnail
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule
from lightning_metakd.report import compare
from lightning_metakd.report.tables import episode_setting, plot_pyplot, plot_report

SIZE = 16
RED = torch.tensor(WRONG, dtype=torch.float32)[:, None] / 255


def write_class_folders(root: Path, classes: int = 3, per_class: int = 4) -> list[Path]:
    """``root/class_<k>/<i>.png``: grey 20 px images, a bright square whose place is the class."""
    rng = np.random.default_rng(0)
    paths = []
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (20, 20), dtype=np.uint8)
            pixels[2 + 5 * k : 8 + 5 * k, 4:14] = 255
            path = root / f"class_{k}" / f"{i:02d}.png"
            Image.fromarray(pixels, "L").save(path)
            paths.append(path)
    return paths


def framed(sheet) -> set[int]:
    """Indices of the files whose tile has a red ring in the padding just above it."""
    marked = set()
    for k, i in enumerate(sheet.shown):
        left, top, right, _ = sheet.picture.tiles[divmod(k, 8)]
        ring = sheet.picture.image[:, top - 2, left:right]
        if ring.sub(RED).abs().amax() < 1e-6:
            marked.add(i)
        else:
            assert ring.eq(1).all(), "an unmarked tile has plain background around it"
    return marked


def test_the_sheet_marks_exactly_the_wrong_predictions(tmp_path):
    files = write_class_folders(tmp_path / "mine", classes=3, per_class=4)
    true = [f.parent.name for f in files]
    predicted = list(true)
    predicted[1], predicted[6] = "class_2", "class_0"  # two mistakes
    sheet = prediction_sheet(tmp_path / "out" / "sheet.png", files, predicted, [0.9] * 12, true)
    assert sheet.wrong == [1, 6] and sheet.shown == list(range(12))
    assert framed(sheet) == {1, 6}
    assert sheet.summary == "10/12 correct (83.3%), 2 wrong in red"
    texts = [text for text, _ in sheet.picture.labels]
    assert texts[0].startswith("10/12 correct") and "caption: predicted class" in texts[0]
    assert texts[1:3] == ["class_0 90%\ntrue class_0", "class_2 90%\ntrue class_0"]
    # The caption of a wrong prediction is red, the others are dark grey.
    for k, (_, (left, top, right, bottom)) in enumerate(sheet.picture.labels[1:]):
        ink = sheet.picture.image[:, top:bottom, left:right].flatten(1)
        reddish = ((ink[0] > 0.6) & (ink[1] < 0.4)).any()
        assert bool(reddish) == (k in (1, 6))
    saved = np.asarray(Image.open(sheet.path).convert("RGB"))
    expected = (sheet.picture.image.permute(1, 2, 0) * 255).round().byte().numpy()
    assert saved.shape == expected.shape and (saved == expected).all()


def test_the_sheet_shows_every_wrong_one_first_and_says_what_it_leaves_out(tmp_path):
    files = write_class_folders(tmp_path, classes=2, per_class=5)
    true = [f.parent.name for f in files]
    predicted = ["class_1"] * 10  # wrong: the five of class_0
    sheet = prediction_sheet(tmp_path / "s.png", files, predicted, true=true, max_images=7)
    assert sheet.shown == [0, 1, 2, 3, 4, 5, 6] and framed(sheet) == {0, 1, 2, 3, 4}
    assert sheet.summary.endswith("; showing 7 of 10, every wrong one first")
    few = prediction_sheet(tmp_path / "t.png", files, predicted, true=true, max_images=3)
    assert few.shown == [0, 1, 2] and few.wrong == [0, 1, 2, 3, 4]
    unknown = prediction_sheet(tmp_path / "u.png", files, predicted, true=[None] * 10)
    assert framed(unknown) == set() and "true class unknown" in unknown.summary
    with pytest.raises(ValueError, match=r"one entry per file \(10 files\)"):
        prediction_sheet(tmp_path / "v.png", files, predicted[:3])


def test_captions_name_characters_the_font_cannot_draw_by_code_point(tmp_path):
    # make_folder_dataset.py's folders: "U+71ED-燭"; DejaVu Sans has no CJK glyph, so the
    # character would be an empty box and the cut caption "U+71E…" would not tell two classes apart.
    from lightning_metakd.callbacks.tensorboard import drawable

    files = write_class_folders(tmp_path, classes=2, per_class=1)
    names = ["U+71ED-燭", "U+71EE-燮"]
    sheet = prediction_sheet(tmp_path / "s.png", files, names[::-1], [1.0, 0.5], true=names)
    texts = [text for text, _ in sheet.picture.labels[1:]]
    assert texts == ["U+71EE 100%\ntrue U+71ED", "U+71ED 50%\ntrue U+71EE"]
    assert sheet.wrong == [0, 1]  # the names are compared as given, not as drawn
    assert drawable("燭") == "U+71ED" and drawable("class_0") == "class_0"
    assert drawable("Ω café") == "Ω café"  # characters the font has stay


def test_thumbnails_enlarge_small_images_sharply_and_keep_the_aspect(tmp_path):
    small = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    Image.fromarray(small, "L").save(tmp_path / "small.png")
    tile = thumbnail(tmp_path / "small.png", 112)
    expected = torch.from_numpy(small).float().div(255).repeat_interleave(4, 0)
    torch.testing.assert_close(tile[0], expected.repeat_interleave(4, 1))  # 4x, no smoothing
    Image.new("RGB", (300, 150), (0, 0, 255)).save(tmp_path / "wide.png")
    tile = thumbnail(tmp_path / "wide.png", 112)
    assert tile.shape == (3, 112, 112)
    blue = (tile[2] > 0.9) & (tile[0] < 0.1)
    assert blue[:, 56].sum() == 56 and blue[56].all()  # 112 x 56, padded above and below


# -- the hooks: metakd finetune and metakd classify ------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A ProtoNet learner (Conv4-8, 16 px) after one meta-training step."""
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    module = MetaLearnerModule(Conv4(hidden=8, image_size=SIZE), ProtoNet(), ways=3)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=folder)  # fmt: skip
    data = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=1,
                          val_episodes=2, test_episodes=2, image_size=SIZE)  # fmt: skip
    trainer.fit(module, data)
    trainer.save_checkpoint(folder / "learner.ckpt")
    return folder / "learner.ckpt"


def test_finetune_writes_the_sheet_of_its_held_out_images(checkpoint, tmp_path):
    root = tmp_path / "mine"
    write_class_folders(root, classes=3, per_class=4)
    out = tmp_path / "out"
    report = run_finetune(str(checkpoint), str(root), str(out), holdout=2, echo=lambda _: None)
    assert report["sheet"] == str(out / SHEET_FILE)
    classifier = FixedClassifier.load(out / "classifier.pt")
    data = read_class_folders(root, SIZE, 1)
    held_out = [data.paths.index(Path(f)) for f in report["holdout_files"]]
    sheet = holdout_sheet(classifier, data, held_out, tmp_path / "again.png")
    saved = np.asarray(Image.open(out / SHEET_FILE).convert("RGB"))
    assert (saved == np.asarray(Image.open(sheet.path).convert("RGB"))).all()
    # Red frames on exactly the held-out images the saved classifier gets wrong.
    predicted = probabilities(classifier, data.images[held_out]).argmax(-1)
    wrong = {k for k, i in enumerate(held_out) if predicted[k] != data.labels[i]}
    assert framed(sheet) == wrong and len(wrong) == 6 - report["adapted"]["correct"]
    assert sheet.summary.startswith(f"{report['adapted']['correct']}/6 correct")
    report = run_finetune(str(checkpoint), str(root), str(tmp_path / "none"), holdout=0,
                          echo=lambda _: None)  # fmt: skip
    assert "sheet" not in report and not (tmp_path / "none" / SHEET_FILE).exists()


def test_classify_writes_a_sheet_with_the_true_class_of_class_folders(checkpoint, tmp_path, capsys):
    from lightning_metakd.cli import main

    root = tmp_path / "mine"
    files = write_class_folders(root, classes=3, per_class=3)
    assert run_finetune(str(checkpoint), str(root), str(tmp_path / "ft"), holdout=1,
                        echo=lambda _: None)  # fmt: skip
    classifier = FixedClassifier.load(tmp_path / "ft" / "classifier.pt")
    export_classifier(classifier, classifier.read_images(files[:2]), tmp_path / "model",
                      ["torch_export"])  # fmt: skip
    loose = tmp_path / "loose.png"
    loose.write_bytes(files[0].read_bytes())
    args = ["classify", "--model", str(tmp_path / "model"), *map(str, [*files, loose])]
    assert main([*args[:3], "--sheet", str(tmp_path / "sheet.png"), *args[3:]]) == 0
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.strip().splitlines()]
    wrong = sum(name != Path(path).parent.name for path, name, _ in rows[:-1])
    assert f"wrote {tmp_path / 'sheet.png'}: {9 - wrong}/9 correct" in captured.err
    assert "1 without a true class" in captured.err
    assert Image.open(tmp_path / "sheet.png").size[0] > 8 * 112
    assert main([*args[:3], "--sheet", str(tmp_path / "loose.png" / "x.png"), *args[3:]]) == 2
    assert "cannot write the sheet" in capsys.readouterr().err


# -- report.png -----------------------------------------------------------------------------------
class KeptFigures:
    """pyplot, except that ``close`` keeps the figure for the test to read."""

    def __init__(self) -> None:
        self.pyplot, self.figures = plot_pyplot(), []

    def subplots(self, *args, **kwargs):
        figure, axes = self.pyplot.subplots(*args, **kwargs)
        self.figures.append(figure)
        return figure, axes

    def close(self, figure) -> None:
        pass

    def __del__(self) -> None:
        for figure in self.figures:
            self.pyplot.close(figure)


README_ROWS = [
    {"name": "teacher", "accuracy": 0.9842, "ci95": 0.0030, "parameters": 111_936},
    {"name": "distilled student", "accuracy": 0.9626, "ci95": 0.0051, "parameters": 7_248},
    {"name": "baseline student", "accuracy": 0.9450, "ci95": 0.0060, "parameters": 7_248},
]


def test_report_plot_has_the_setting_readable_ticks_and_separate_names(tmp_path):
    pyplot = KeptFigures()
    plot_report(pyplot, README_ROWS, tmp_path / "report.png", episode_setting(5, 1, 600, 15))
    (figure,) = pyplot.figures
    axes = figure.axes[0]
    assert axes.get_title() == (
        "Accuracy against size\n5-way 1-shot, 600 test episodes, 15 queries per class"
    )
    low, high = axes.get_xlim()
    ticks = [t.get_text() for t in axes.get_xticklabels() if low <= t.get_position()[0] <= high]
    assert ticks == ["5k", "10k", "20k", "50k", "100k", "200k"]
    names = [t.get_text() for t in axes.get_legend().get_texts()]
    assert names == [
        "teacher: 98.42 ± 0.30%, 112k parameters",
        "distilled student: 96.26 ± 0.51%, 7.25k parameters",
        "baseline student: 94.50 ± 0.60%, 7.25k parameters",
    ]
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in axes.get_legend().get_texts()]
    assert not any(a.overlaps(b) for k, a in enumerate(boxes) for b in boxes[k + 1 :])
    below = axes.xaxis.label.get_window_extent(renderer).y0  # under the axis title
    assert all(b.y1 < below for b in boxes)
    assert Image.open(tmp_path / "report.png").size[0] >= 500


def test_compare_titles_the_plot_with_the_test_setting(tmp_path, monkeypatch):
    import lightning_metakd.report.comparison as comparison

    seen = []
    monkeypatch.setattr(
        comparison, "plot_report", lambda _p, _r, path, setting: seen.append(setting)
    )
    dm = TinyDataModule(ways=3, shots=2, queries=2, test_ways=4, test_shots=1, test_queries=3,
                        val_episodes=2, test_episodes=5, image_size=SIZE)  # fmt: skip
    learner = MetaLearnerModule(Conv4(hidden=4, image_size=SIZE), ProtoNet(), ways=4).learner
    compare({"it": learner}, dm, tmp_path, warmup=0, repeats=1)
    grouped = TinyDataModule(queries=2, test_ways=2, val_episodes=2, test_episodes=3,
                             image_size=SIZE, groups=2, grouping="group")  # fmt: skip
    compare({"it": learner}, grouped, tmp_path, warmup=0, repeats=1)
    assert seen == [
        "4-way 1-shot, 5 test episodes, 3 queries per class",
        "2-way 1-shot within a group, 3 test episodes, 2 queries per class",
    ]
    assert json.loads((tmp_path / "report.json").read_text())[0]["name"] == "it"

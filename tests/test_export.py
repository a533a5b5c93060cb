"""Export of a fixed classifier to torch.export / ONNX, and ``metakd classify`` on image files."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyDataModule
from PIL import Image

from lightning_metakd.deploy import FixedClassifier, PrototypeClassifier
from lightning_metakd.deploy.export import (
    export_classifier,
    preprocessing_from_datamodule,
    verify_export,
)
from lightning_metakd.deploy.predict import classify, load_exported, read_images
from lightning_metakd.models import Conv4
from lightning_metakd.models.classifier import Classifier

IMAGE_SIZE = 16


def make_classifier(head: str, statistics: str = "batch", channels: int = 1) -> FixedClassifier:
    """A Conv4-8 FixedClassifier for 4 classes with a linear head or a prototype layer."""
    torch.manual_seed(0)
    backbone = Conv4(channels, 8, image_size=IMAGE_SIZE)
    if head == "linear":
        network = Classifier(backbone, ways=4)
    else:
        network = PrototypeClassifier(backbone, ways=4, num_features=backbone.num_features)
        with torch.no_grad():
            network.prototypes.normal_()
    names = [f"kanji-{i}" for i in range(4)]
    classifier = FixedClassifier(network, names, IMAGE_SIZE, channels)
    if statistics == "fixed":
        classifier.fix_statistics(torch.rand(8, channels, IMAGE_SIZE, IMAGE_SIZE))
    return classifier.eval()


@pytest.fixture(scope="module", params=[("linear", "batch"), ("prototypes", "fixed")], ids=str)
def exported(request, tmp_path_factory) -> tuple[FixedClassifier, Path, dict]:
    """Both head kinds, one with batch and one with fixed BatchNorm statistics."""
    head, statistics = request.param
    model = make_classifier(head, statistics)
    out = tmp_path_factory.mktemp(f"export-{head}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_classifier(model, torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE), out)
    warned = any("fix_statistics" in str(w.message) for w in caught)
    assert warned == (statistics == "batch")
    return model, out, report


def test_export_writes_files_and_verifies_both_formats(exported) -> None:
    model, out, report = exported
    assert (out / "model.pt2").is_file() and (out / "model.onnx").is_file()
    assert not list(out.glob("*.data")), "ONNX weights must live inside model.onnx"
    assert report["bytes"]["onnx"] == (out / "model.onnx").stat().st_size > 0
    assert set(report["max_abs_diff"]) == {"torch_export", "onnx"}
    assert all(0 <= d <= 1e-4 for d in report["max_abs_diff"].values())
    meta = json.loads((out / "classes.json").read_text())
    assert meta["class_names"] == model.class_names
    assert (meta["image_size"], meta["channels"], meta["invert"]) == (IMAGE_SIZE, 1, False)
    assert meta["statistics"] == model.statistics
    assert meta["mean"] is None and meta["std"] is None


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_reloaded_export_matches_pytorch_at_another_batch_size(exported, fmt) -> None:
    model, out, _ = exported
    held_out = torch.rand(5, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    runner = load_exported(out, fmt)
    with torch.no_grad():
        expected = model(held_out)
    logits = runner(held_out)
    assert logits.shape == (5, 4)  # traced at batch 2, run at batch 5: the batch is dynamic
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    one = runner(held_out[:1])
    with torch.no_grad():
        torch.testing.assert_close(one, model(held_out[:1]), atol=1e-4, rtol=0)
    # fixed statistics: an image's logits do not depend on its batch; batch statistics: they do
    alone_equals_batched = torch.allclose(one, logits[:1], atol=1e-4)
    assert alone_equals_batched == (model.statistics == "fixed")


def test_verify_export_rejects_a_model_that_changed(exported) -> None:
    model, out, _ = exported
    images = torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.5)
    assert max(verify_export(model, out, images).values()) <= 1e-4  # control
    with pytest.raises(AssertionError, match=r"max \|Δlogits\|.*rtol"):
        verify_export(changed, out, images, formats=("onnx",))
    # rtol scales the tolerance with the largest logit: a loose enough one accepts the change
    deltas = verify_export(changed, out, images, formats=("onnx",), rtol=1e3)
    assert deltas["onnx"] > 1e-4


def test_export_refuses_bad_input(tmp_path) -> None:
    model = make_classifier("linear", "fixed")
    with pytest.raises(ValueError, match="per image but the model takes"):
        export_classifier(model, torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE), tmp_path)
    with pytest.raises(ValueError, match="formats"):
        export_classifier(model, torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE), tmp_path, ["tflite"])
    with pytest.raises(ValueError, match="class_names"):
        export_classifier(torch.nn.Flatten(), torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE), tmp_path)


def test_single_image_example_still_exports_a_dynamic_batch(tmp_path) -> None:
    model = make_classifier("prototypes", "fixed", channels=3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    report = export_classifier(
        model, torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE), tmp_path, ["onnx"], mean=mean, std=std
    )
    assert set(report["files"]) == {"onnx"} and not (tmp_path / "model.pt2").exists()
    assert load_exported(tmp_path)(torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (3, 4)
    assert json.loads((tmp_path / "classes.json").read_text())["mean"] == list(mean)


def test_model_pt2_size_does_not_grow_with_the_example_batch(tmp_path) -> None:
    """torch.export.save stores the example inputs: only two images, and not a slice's storage."""
    model = make_classifier("linear", "fixed")
    many = torch.rand(256, 1, IMAGE_SIZE, IMAGE_SIZE)  # 256 KB of pixels
    sliced = export_classifier(model, many[:32], tmp_path / "sliced", ["torch_export"])
    fresh = export_classifier(model, many[:2].clone(), tmp_path / "fresh", ["torch_export"])
    assert sliced["bytes"]["torch_export"] == fresh["bytes"]["torch_export"]
    assert fresh["bytes"]["torch_export"] < many.numel() * 4


def test_onnx_without_onnxruntime_falls_back_to_the_reference_evaluator(exported, monkeypatch):
    model, out, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    runner = load_exported(out, "onnx")
    assert runner._session is None
    images = torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(runner(images), model(images), atol=1e-4, rtol=0)


def test_missing_onnx_packages_name_the_install_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    model = make_classifier("linear", "fixed")
    with pytest.raises(ImportError, match=r"lightning-metakd\[export\]"):
        export_classifier(model, torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE), tmp_path)
    report = export_classifier(  # control: torch.export alone needs no ONNX package
        model, torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE), tmp_path, ["torch_export"]
    )
    assert set(report["max_abs_diff"]) == {"torch_export"}


def write_pngs(directory: Path, count: int, mode: str = "L", size: int = 20) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        shape = (size, size) if mode == "L" else (size, size, 3)
        path = directory / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


def test_read_images_follows_the_data_pipeline(tmp_path) -> None:
    """RGB files become grey, are resized like ClassDataset does, then inverted and normalised."""
    paths = write_pngs(tmp_path, 2, mode="RGB")
    meta = {"image_size": IMAGE_SIZE, "channels": 1, "invert": True, "mean": [0.5], "std": [0.25]}
    images = read_images(paths, meta)
    from lightning_metakd.data import ClassDataset

    reference = ClassDataset(paths, [0, 1], ["a", "b"], image_size=IMAGE_SIZE, invert=True)
    expected = torch.stack([reference.load_image(i) for i in range(2)])
    assert images.shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(images, (expected - 0.5) / 0.25)
    assert images.min() < 0  # normalised, not in [0, 1]


def test_preprocessing_from_datamodule_reads_invert_and_normalisation() -> None:
    from lightning_metakd.data.miniimagenet import Normalize

    dm = TinyDataModule(queries=2, eval_transform=Normalize(mean=[0.1], std=[0.2]))
    with pytest.raises(ValueError, match="setup"):
        preprocessing_from_datamodule(dm)
    dm.setup("test")
    assert preprocessing_from_datamodule(dm) == {"invert": False, "mean": [0.1], "std": [0.2]}
    plain = TinyDataModule(queries=2)
    plain.setup("test")
    assert preprocessing_from_datamodule(plain) == {"invert": False, "mean": None, "std": None}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from lightning_metakd.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "classify", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_metakd_classify_prints_pytorch_argmax_per_image(exported, tmp_path, fmt, capsys) -> None:
    from lightning_metakd.cli import main

    model, out, _ = exported
    paths = write_pngs(tmp_path, 3)
    if fmt == "torch_export":  # the console path once (the default format: model.pt2) ...
        proc = run_cli("--model", str(out), *map(str, paths))
        assert proc.returncode == 0, proc.stderr
        stdout = proc.stdout
    else:  # ... and in-process, which is quicker, for ONNX
        assert main(["classify", "--model", str(out), "--format", fmt, *map(str, paths)]) == 0
        stdout = capsys.readouterr().out
    lines = stdout.strip().splitlines()
    assert len(lines) == 3
    with torch.no_grad():
        images = model.read_images(paths)  # the other reader of image files agrees with predict's
        if model.statistics == "fixed":
            logits = model(images)
        else:  # classify feeds a batch-statistics model one image per forward pass
            logits = torch.cat([model(x[None]) for x in images])
    probabilities = logits.softmax(-1)
    for line, path, p, k in zip(lines, paths, probabilities, logits.argmax(1), strict=True):
        shown_path, name, probability = line.split("\t")
        assert shown_path == str(path)
        assert name == model.class_names[int(k)]
        assert float(probability) == pytest.approx(float(p[k]), abs=1e-4)
    assert classify(out, paths, fmt) == [
        (
            line.split("\t")[0],
            line.split("\t")[1],
            pytest.approx(float(line.split("\t")[2]), abs=1e-4),
        )
        for line in lines
    ]


def test_metakd_classify_errors_are_clear(tmp_path, capsys) -> None:
    from lightning_metakd.cli import main

    out = tmp_path / "model"
    export_classifier(
        make_classifier("linear", "fixed"), torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE), out, ["onnx"]
    )
    (png,) = write_pngs(tmp_path, 1)
    missing = run_cli("--model", str(tmp_path / "nowhere"), str(png))
    assert missing.returncode == 2 and not missing.stdout
    assert "does not exist" in missing.stderr and "export_classifier" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert main(["classify", "--model", str(tmp_path), str(png)]) == 2
    assert "no classes.json" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["classify", "--model", str(out), str(png), str(broken)]) == 2
    captured = capsys.readouterr()
    assert "Cannot read image file" in captured.err and "broken.png" in captured.err
    assert not captured.out  # nothing printed for the readable image either
    assert main(["classify", "--model", str(out), str(tmp_path / "absent.png")]) == 2
    assert "No such image file" in capsys.readouterr().err
    assert main(["classify", "--model", str(out), "--format", "onnx", str(png)]) == 0  # control
    assert capsys.readouterr().out.count("\t") == 2


def test_metakd_export_takes_the_held_out_images_of_finetune(tmp_path, capsys) -> None:
    """`metakd export --classifier` checks the files on finetune.json's held-out images."""
    import json

    from lightning_metakd.cli import main

    model = make_classifier("prototypes", "fixed")
    model.save(tmp_path / "classifier.pt")
    assert main(["export", "--classifier", str(tmp_path / "classifier.pt")]) == 2
    assert "no finetune.json" in capsys.readouterr().err  # nothing to verify on: a clear error
    (tmp_path / "held_out").mkdir()
    paths = write_pngs(tmp_path / "held_out", 3, size=IMAGE_SIZE)
    (tmp_path / "finetune.json").write_text(json.dumps({"holdout_files": list(map(str, paths))}))
    assert main(["export", "--classifier", str(tmp_path / "classifier.pt")]) == 0
    out = capsys.readouterr().out
    assert "on 3 images" in out and "model.onnx" in out
    exported = load_exported(tmp_path / "export", "onnx")
    with torch.no_grad():
        expected = model(model.read_images(paths))
    torch.testing.assert_close(exported(model.read_images(paths)), expected, atol=1e-4, rtol=0)

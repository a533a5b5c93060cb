"""Export a fixed classifier to ``torch.export`` (``model.pt2``) and ONNX (``model.onnx``).

A fine-tuned classifier (a backbone with the adapted head or the prototypes folded in, see
:mod:`lightning_metakd.deploy.classifier`) is a plain ``images -> logits`` function, so it leaves
Python behind: :func:`export_classifier` writes

- ``model.pt2``: ``torch.export.save`` of ``torch.export.export(model, (images,))``, loaded back with
  ``torch.export.load(path).module()`` (no source code of ours needed);
- ``model.onnx``: the ONNX graph (input ``images``, output ``logits``) for ONNX Runtime and friends;
- ``classes.json``: what a caller needs to feed the model — class names, image size, channels and
  the preprocessing of the data pipeline (``invert``, per-channel ``mean``/``std``).

Both graphs have a dynamic batch dimension and are checked against the PyTorch model on the given
images before the function returns (:func:`verify_export`): max ``|Δlogits|`` must be ``<= atol``
(``1e-4``; plus ``rtol`` times the largest logit, 0 unless given).
:mod:`lightning_metakd.deploy.predict` runs the exported files on image files.

Example::

    report = export_classifier(model, images, "deploy/student")
    report["max_abs_diff"]
    # {'torch_export': 0.0, 'onnx': 4.7e-07}
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_metakd.deploy.predict import (
    CLASSES_FILE,
    FORMATS,
    MODEL_FILES,
    load_exported,
    require_onnx,
)


def preprocessing_from_datamodule(datamodule: Any, split: str = "test") -> dict[str, Any]:
    """The preprocessing that ``datamodule`` applies to ``split`` images, as ``classes.json`` stores it.

    Every data source reads an image as floats in ``[0, 1]``, converts it to grey or RGB, optionally
    inverts it (``1 - x``, Omniglot), resizes it (bilinear, antialiased) and then applies the split's
    transform (:class:`~lightning_metakd.data.ClassDataset`). The transform is recorded when it is a
    per-channel normalisation (``mean``/``std``, mini-ImageNet's ``Normalize``); other callables
    cannot be written to JSON and are refused.

    Returns:
        ``{"invert": bool, "mean": [C floats] | None, "std": [C floats] | None}``.
    """
    splits = getattr(datamodule, "splits", None)
    if not splits or split not in splits:
        raise ValueError(
            f"{type(datamodule).__name__} has no {split!r} split yet: call "
            f"datamodule.setup('test') before reading its preprocessing."
        )
    dataset = splits[split]
    transform = dataset.transform
    mean = std = None
    if transform is not None:
        mean = getattr(transform, "mean_values", None)
        std = getattr(transform, "std_values", None)
        before = getattr(transform, "before", None)
        if mean is None or std is None or before is not None:
            raise ValueError(
                f"The {split} transform {transform!r} is not a plain per-channel normalisation, so "
                "it cannot be stored in classes.json; pass invert/mean/std to export_classifier "
                "yourself (the exported model must see the images the transform would produce)."
            )
        mean, std = [float(v) for v in mean], [float(v) for v in std]
    return {"invert": bool(getattr(dataset, "invert", False)), "mean": mean, "std": std}


def _metadata(
    model: nn.Module,
    invert: bool | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> dict[str, Any]:
    missing = [a for a in ("class_names", "image_size", "channels") if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"{type(model).__name__} has no {missing} attribute(s); export a "
            "lightning_metakd.deploy.FixedClassifier (or any module that states class_names, "
            "image_size and channels)."
        )
    channels = int(model.channels)
    if mean is None and std is None:  # a FixedClassifier states its own normalisation
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != channels:
            raise ValueError(
                f"{name} has {len(values)} values but the model has {channels} channels."
            )
    if (mean is None) != (std is None):
        raise ValueError("Give both mean and std (or neither).")
    if std is not None and any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}.")
    return {
        "class_names": [str(c) for c in model.class_names],
        "image_size": int(model.image_size),
        "channels": channels,
        "invert": bool(getattr(model, "invert", False) if invert is None else invert),
        # "fixed": each image is classified on its own; "batch": BatchNorm uses the statistics of
        # the batch it is given (see FixedClassifier), so predict feeds one image at a time.
        "statistics": getattr(model, "statistics", None),
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
    }


def _traceable_example(model: nn.Module, example_images: Tensor) -> Tensor:
    """A float ``[2, C, H, W]`` example: a traced batch of 1 would pin the batch size to 1."""
    if example_images.dim() != 4:
        raise ValueError(
            f"example_images must be [B, C, H, W], got shape {tuple(example_images.shape)}."
        )
    expected = (int(model.channels), int(model.image_size), int(model.image_size))
    if tuple(example_images.shape[1:]) != expected:
        raise ValueError(
            f"example_images are {tuple(example_images.shape[1:])} per image but the model takes "
            f"{expected} (channels, image_size, image_size)."
        )
    # torch.export.save stores the example: two images, cloned (a slice carries its whole storage)
    example = example_images[:2].detach().float().clone()
    return example.repeat(2, 1, 1, 1) if len(example) == 1 else example


def export_classifier(
    model: nn.Module,
    example_images: Tensor,
    out_dir: str | Path,
    formats: Iterable[str] = FORMATS,
    *,
    invert: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    check_images: Tensor | None = None,
    atol: float = 1e-4,
    rtol: float = 0.0,
) -> dict[str, Any]:
    """Write ``model`` to ``out_dir`` in ``formats`` and check the files against it.

    Args:
        model: ``images [B, C, H, W] -> logits [B, N]`` with ``class_names``, ``image_size`` and
            ``channels`` attributes (a :class:`~lightning_metakd.deploy.FixedClassifier`).
        example_images: preprocessed images ``[B, C, H, W]``; the graphs are traced with the first
            two (one image is repeated, so the batch dimension stays dynamic) and all of them are
            the default ``check_images``.
        out_dir: created if needed; existing model files there are overwritten.
        formats: any of ``"torch_export"`` (``model.pt2``) and ``"onnx"`` (``model.onnx``).
        invert, mean, std: the preprocessing recorded in ``classes.json`` for
            :mod:`~lightning_metakd.deploy.predict` (see :func:`preprocessing_from_datamodule`);
            ``invert=None`` takes ``model.invert`` (``False`` when absent); ``mean``/``std``
            ``None`` take ``model.mean``/``model.std`` (no normalisation when absent, the default
            of every data source but mini-ImageNet).
        check_images: the images the exported files are verified on (held-out images, ideally);
            defaults to ``example_images``.
        atol, rtol: the largest accepted ``max |logits_exported - logits_pytorch|`` is
            ``atol + rtol * max |logits_pytorch|``. float32 rounding alone grows with the logits:
            squared distances in the hundreds may need ``rtol=1e-5``.

    Returns:
        ``{"files": {format: path}, "bytes": {format: size on disk}, "max_abs_diff": {format: float},
        "classes": path to classes.json}``.

    Raises:
        AssertionError: an exported model's logits differ from PyTorch's by more than that.
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in MODEL_FILES]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}.")
    if "onnx" in formats:
        require_onnx()
    metadata = _metadata(model, invert, mean, std)
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if metadata["statistics"] == "batch" and has_batch_norm:
        warnings.warn(
            f"This {type(model).__name__} normalises with the statistics of each batch it sees, so "
            "an image's logits depend on the other images of its batch; call "
            "classifier.fix_statistics(labelled_images) before exporting to classify each image "
            "on its own (`metakd classify` feeds such a model one image at a time).",
            UserWarning,
            stacklevel=2,
        )
    example = _traceable_example(model, example_images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    was_training = model.training
    model.eval()
    try:
        batch = torch.export.Dim("batch", min=1)
        if "torch_export" in formats:
            files["torch_export"] = out / MODEL_FILES["torch_export"]
            with torch.no_grad():
                program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, files["torch_export"])
        if "onnx" in formats:
            files["onnx"] = out / MODEL_FILES["onnx"]
            # The dynamo-based exporter (onnxscript) works offline; external_data=False keeps the
            # weights inside the one .onnx file.
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (example,),
                    files["onnx"],
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_shapes=({0: batch},),
                    external_data=False,
                    dynamo=True,
                    verbose=False,
                )
    finally:
        model.train(was_training)
    classes = out / CLASSES_FILE
    classes.write_text(
        json.dumps({**metadata, "formats": sorted(files)}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    deltas = verify_export(
        model,
        out,
        example_images if check_images is None else check_images,
        tuple(files),
        atol,
        rtol,
    )
    return {
        "files": {f: str(p) for f, p in files.items()},
        "bytes": {f: p.stat().st_size for f, p in files.items()},
        "max_abs_diff": deltas,
        "classes": str(classes),
    }


def verify_export(
    model: nn.Module,
    model_dir: str | Path,
    images: Tensor,
    formats: Iterable[str] = FORMATS,
    atol: float = 1e-4,
    rtol: float = 0.0,
) -> dict[str, float]:
    """Max ``|logits_exported - logits_pytorch|`` of each exported file on ``images``.

    Each file is loaded back as a deployment would load it (``torch.export.load(...).module()``;
    an ONNX Runtime session, or ``onnx.reference`` without onnxruntime) and run on ``images``
    ``[B, C, H, W]``. Raises ``AssertionError`` naming the format and the difference if it is over
    ``atol + rtol * max |logits|``; returns ``{format: max_abs_diff}`` otherwise.
    """

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(images.float())
    finally:
        model.train(was_training)
    scale = float(expected.abs().max())
    deltas: dict[str, float] = {}
    for fmt in formats:
        runner = load_exported(model_dir, fmt)
        logits = runner(images.float())
        if logits.shape != expected.shape:
            raise AssertionError(
                f"The {fmt} export returns logits of shape {tuple(logits.shape)}, PyTorch "
                f"{tuple(expected.shape)}."
            )
        deltas[fmt] = float((logits - expected).abs().max())
        if not deltas[fmt] <= atol + rtol * scale:
            raise AssertionError(
                f"The {fmt} export of {type(model).__name__} in {model_dir} differs from the "
                f"PyTorch model by max |Δlogits| = {deltas[fmt]:.3g} > atol + rtol * max|logits| = "
                f"{atol:g} + {rtol:g} * {scale:.3g} on {len(images)} images: the export is not "
                "faithful (an operator exported with different semantics, or a model that changed "
                "after export). float32 rounding in a rewritten graph (BatchNorm folded into "
                f"convolutions, sums reordered) reaches about 1e-6 * max|logits| = {scale * 1e-6:.2g}"
                "; pass rtol=1e-5 if the difference is of that order."
            )
    return deltas


def export_main(argv: list[str]) -> int:
    """``metakd export``: write a fine-tuned classifier as ``model.pt2`` and ``model.onnx``."""
    from lightning_metakd.command_errors import fail
    from lightning_metakd.command_line import export_parser
    from lightning_metakd.deploy.classifier import FixedClassifier

    parser = export_parser()
    opts = parser.parse_args(argv)
    if opts.learner is not None:
        from lightning_metakd.deploy.learner_export import export_learner_main

        return export_learner_main(opts)
    path = Path(opts.classifier)
    try:
        classifier = FixedClassifier.load(path)
        images = opts.images
        if images is None:
            report = path.parent / "finetune.json"
            if not report.is_file():
                raise ValueError(
                    f"no --images given and no finetune.json beside {path} to take the held-out "
                    "images from; pass --images IMAGE [IMAGE ...]."
                )
            images = json.loads(report.read_text()).get("holdout_files") or []
            if not images:
                raise ValueError(f"{report} lists no images; pass --images IMAGE [IMAGE ...].")
        batch = classifier.read_images(images)
        out = Path(opts.output) if opts.output else path.parent / "export"
        result = export_classifier(
            classifier, batch, out, opts.formats, atol=opts.atol, rtol=opts.rtol
        )
    except (OSError, ValueError, ImportError, AssertionError) as err:
        return fail("metakd export", err)
    for fmt, file in result["files"].items():
        print(
            f"{file}: {result['bytes'][fmt] / 1024:.0f} kB, max |Δlogits| vs PyTorch "
            f"{result['max_abs_diff'][fmt]:.2e} on {len(batch)} images"
        )
    print(f"{result['classes']}: class names and preprocessing")
    return 0

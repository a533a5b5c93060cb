"""Classify image files with an exported classifier: ``metakd classify --model DIR IMAGE ...``.

``DIR`` is what :func:`~lightning_metakd.deploy.export.export_classifier` wrote: ``model.pt2``
and/or ``model.onnx`` plus ``classes.json``. Images are read exactly as the data pipeline reads
them (:class:`~lightning_metakd.data.ClassDataset`: grey or RGB, ``[0, 1]``, optional inversion,
antialiased resize to ``image_size``), then normalised with the stored ``mean``/``std``. Each image
prints ``path<TAB>class<TAB>probability`` (softmax of the logits); ``--sheet out.png`` also
draws them with their predictions (:func:`~lightning_metakd.deploy.sheet.classify_sheet`).

Example::

    classifier = load_exported("deploy/student")
    classifier(read_images(["a.png"], classifier.metadata)).argmax(1)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_metakd.deploy.classifier import read_image_files

#: Files written by :func:`~lightning_metakd.deploy.export.export_classifier`, by format.
MODEL_FILES = {"torch_export": "model.pt2", "onnx": "model.onnx"}
CLASSES_FILE = "classes.json"
FORMATS = tuple(MODEL_FILES)
INSTALL_HINT = "pip install 'lightning-metakd[export]'"


def require_onnx(*modules: str) -> None:
    """Import ``modules`` (default: onnx, onnxscript) or fail with the install command."""
    import importlib

    for name in modules or ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"ONNX export and inference need the `{name}` package, which is not installed: "
                f"{INSTALL_HINT} (installs onnx, onnxscript and onnxruntime)."
            ) from err


class ExportedClassifier:
    """An exported model loaded for inference: ``images [B, C, H, W] -> logits [B, N]``.

    ``format`` is ``"torch_export"`` (``torch.export.load(...).module()``) or ``"onnx"`` (an ONNX
    Runtime session on the CPU, or ``onnx.reference.ReferenceEvaluator`` when onnxruntime is
    missing). ``metadata`` is the parsed ``classes.json``.
    """

    def __init__(self, model_dir: Path, format: str, metadata: dict[str, Any], threads: int = 0):
        self.model_dir, self.format, self.metadata = model_dir, format, metadata
        self.class_names: list[str] = metadata["class_names"]
        path = model_dir / MODEL_FILES[format]
        if format == "torch_export":
            self._module = torch.export.load(path).module()
            return
        self._graph = OnnxGraph(path, threads)
        self._session = self._graph.session

    def __call__(self, images: Tensor) -> Tensor:
        if self.format == "torch_export":
            with torch.no_grad():
                return self._module(images)
        (logits,) = self._graph.run([images.detach().float().contiguous().numpy()])
        return torch.from_numpy(np.asarray(logits))


class OnnxGraph:
    """An ONNX file run on numpy arrays: an ONNX Runtime CPU session, or
    ``onnx.reference.ReferenceEvaluator`` when onnxruntime is missing (slow, but exact).

    :meth:`run` takes the inputs in the graph's order and returns every output in order.
    """

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.path = path
        try:
            import onnxruntime
        except ImportError:
            require_onnx("onnx")
            from onnx.reference import ReferenceEvaluator

            self.session = None
            self._reference = ReferenceEvaluator(str(path))
            self.input_names = list(self._reference.input_names)
            return
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        inputs = dict(zip(self.input_names, feeds, strict=True))
        if self.session is not None:
            return self.session.run(None, inputs)
        return list(self._reference.run(None, inputs))


def read_model_json(
    model_dir: str | Path, name: str, written_by: str, not_it: str
) -> tuple[Path, dict[str, Any]]:
    """``(path, parsed)`` of the JSON file ``name`` in an export folder ``model_dir``.

    A missing folder or file raises ``FileNotFoundError`` with what the folder should be:
    ``"Model directory DIR does not exist; pass the directory that {written_by}."`` and
    ``"DIR has no NAME; {not_it}."``.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"Model directory {model_dir} does not exist; pass the directory that {written_by}."
        )
    path = model_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {name}; {not_it}.")
    return path, json.loads(path.read_text(encoding="utf-8"))


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """Parse ``classes.json`` of ``model_dir``, with an error that says what is missing."""
    _, metadata = read_model_json(
        model_dir,
        CLASSES_FILE,
        "lightning_metakd.deploy.export_classifier wrote (model.pt2/model.onnx + classes.json)",
        "it is not an exported classifier directory (re-export it with "
        "lightning_metakd.deploy.export_classifier)",
    )
    return metadata


def load_exported(
    model_dir: str | Path, format: str | None = None, threads: int = 0
) -> ExportedClassifier:
    """Load the exported model of ``model_dir``; ``format=None`` takes ``model.pt2`` if present."""
    model_dir = Path(model_dir)
    metadata = read_metadata(model_dir)
    present = [f for f in FORMATS if (model_dir / MODEL_FILES[f]).is_file()]
    if format is None:
        if not present:
            raise FileNotFoundError(
                f"{model_dir} holds neither {MODEL_FILES['torch_export']} nor "
                f"{MODEL_FILES['onnx']}; export the classifier there first."
            )
        format = present[0]
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    if format not in present:
        raise FileNotFoundError(
            f"{model_dir} has no {MODEL_FILES[format]}; it holds {present or 'no model file'}."
        )
    return ExportedClassifier(model_dir, format, metadata, threads)


def read_images(paths: Sequence[str | Path], metadata: dict[str, Any]) -> Tensor:
    """Image files as the float batch ``[B, C, image_size, image_size]`` the model expects.

    The pipeline's own loader (:meth:`ClassDataset.load_image`) reads, converts, inverts and
    resizes; the stored ``mean``/``std`` normalise afterwards, as the split's transform did.
    """
    return read_image_files(
        paths,
        metadata["image_size"],
        metadata["channels"],
        metadata.get("invert", False),
        metadata.get("mean"),
        metadata.get("std"),
    )


def classify(
    model_dir: str | Path,
    paths: Sequence[str | Path],
    format: str | None = None,
    batch_size: int | None = None,
) -> list[tuple[str, str, float]]:
    """``(path, class name, probability)`` for each image file, in order.

    Images go through the model ``batch_size`` at a time. The default is 32 for a classifier
    exported with fixed BatchNorm statistics (``FixedClassifier.fix_statistics``) and 1 otherwise:
    with batch statistics the logits of an image depend on the rest of its batch, and one image per
    pass keeps each answer independent of the other files.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    classifier = load_exported(model_dir, format)
    if batch_size is None:
        batch_size = 32 if classifier.metadata.get("statistics") == "fixed" else 1
    images = read_images(paths, classifier.metadata)
    logits = torch.cat([classifier(chunk) for chunk in images.split(batch_size)])
    probabilities, indices = logits.softmax(-1).max(-1)
    names = classifier.class_names
    return [
        (str(p), names[int(i)], float(q))
        for p, i, q in zip(paths, indices, probabilities, strict=True)
    ]


def classify_main(argv: list[str]) -> int:
    """``metakd classify``: print ``path<TAB>class<TAB>probability`` for every image."""
    from lightning_metakd.command_errors import fail
    from lightning_metakd.command_line import classify_parser
    from lightning_metakd.deploy.exported_learner import classify_enrolled, is_learner_export

    parser = classify_parser()
    opts = parser.parse_args(argv)
    class_names = None
    try:
        if opts.enrol or opts.state or is_learner_export(opts.model):
            rows, class_names = classify_enrolled(
                opts.model,
                opts.images,
                opts.enrol,
                opts.state,
                opts.format,
                opts.save_state,
                opts.batch_size,
            )
        else:
            rows = classify(opts.model, opts.images, opts.format, opts.batch_size)
    except (OSError, ValueError, ImportError) as err:
        return fail("metakd classify", err)
    for path, name, probability in rows:
        print(f"{path}\t{name}\t{probability:.4f}")
    if opts.sheet:
        from lightning_metakd.deploy.sheet import classify_sheet

        try:
            names = class_names or read_metadata(opts.model)["class_names"]
            sheet = classify_sheet(opts.sheet, rows, names)
        except OSError as err:
            return fail("metakd classify", OSError(f"cannot write the sheet: {err}"))
        print(f"metakd classify: wrote {sheet.path}: {sheet.summary}", file=sys.stderr)
    return 0

"""Run an exported learner: enrol classes from a few images each, then classify, without training.

:func:`~lightning_metakd.deploy.learner_export.export_learner` writes ``enrol`` and ``classify``
graphs and ``learner.json``; :func:`load_exported_learner` loads them (ONNX Runtime by default, or
the ``torch.export`` programs) as an :class:`ExportedLearner`, which checks every input before a
graph sees it: support labels ``0..N-1`` each present, images of the model's size and channels, a
state enrolled by this very model (its fingerprint). ``metakd classify --model DIR --enrol FOLDER
IMAGE ...`` (:func:`classify_enrolled`) enrols the classes of a folder of class folders and labels
the images.

Example::

    learner = load_exported_learner("runs/kanji-distill-protonet/version_0/export")
    state = learner.enrol(support_x, support_y, ["kanji-a", "kanji-b", "kanji-c"])
    state.save("my_classes.npz")
    learner.classify(EnrolledState.load("my_classes.npz"), query_x).argmax(-1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_metakd.deploy.classifier import normalize_images, read_image_files
from lightning_metakd.deploy.learner_graphs import FORMAT, GRAPH_FILES, LEARNER_FILE, ExportError
from lightning_metakd.deploy.predict import FORMATS, OnnxGraph, read_model_json

#: Keys of an :class:`EnrolledState` file that are not state tensors.
_FINGERPRINT, _CLASSES = "__fingerprint__", "__class_names__"


@dataclass(frozen=True)
class EnrolledState:
    """What an exported learner knows about a task after ``enrol``: its state tensors by name
    (``learner.json``'s ``state``), the class of each output column, and the fingerprint of the
    model that enrolled it. :meth:`save` / :meth:`load` keep it as a ``.npz`` file (no pickles)."""

    tensors: dict[str, np.ndarray]
    class_names: list[str]
    fingerprint: str

    def save(self, path: str | Path) -> Path:
        """Write the state to ``path`` (``.npz``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            np.savez(
                handle,
                **self.tensors,
                **{_FINGERPRINT: np.array(self.fingerprint), _CLASSES: np.array(self.class_names)},
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> EnrolledState:
        """Read a state that :meth:`save` wrote, with an error naming the file when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No state file {path}; write one with `metakd classify --enrol FOLDER "
                "--save_state FILE` or EnrolledState.save."
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{path} is not a state file written by EnrolledState.save: {err}"
            ) from None
        if _FINGERPRINT not in arrays or _CLASSES not in arrays:
            raise ValueError(
                f"{path} is not a state file written by EnrolledState.save (no fingerprint); "
                "enrol the classes again."
            )
        fingerprint = str(arrays.pop(_FINGERPRINT))
        names = [str(n) for n in arrays.pop(_CLASSES)]
        return cls(arrays, names, fingerprint)


def read_learner_metadata(model_dir: str | Path) -> dict[str, Any]:
    """Parse ``learner.json`` of ``model_dir``, with an error that says what the folder is instead."""
    path, metadata = read_model_json(
        model_dir,
        LEARNER_FILE,
        "`metakd export --learner` wrote (enrol/classify graphs + learner.json)",
        "it is not an exported learner (export one with `metakd export --learner CHECKPOINT`; a "
        "fixed classifier has classes.json and takes no --enrol)",
    )
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not the learner.json of an exported learner.")
    return metadata


def is_learner_export(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds an exported learner (``learner.json``)."""
    return (Path(model_dir) / LEARNER_FILE).is_file()


class _TorchExportGraph:
    """A ``torch.export`` program run on numpy arrays, like an ONNX Runtime session."""

    def __init__(self, path: Path) -> None:
        self.module = torch.export.load(path).module()

    def run(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in feeds))
        return [t.numpy() for t in (out if isinstance(out, tuple | list) else (out,))]


class ExportedLearner:
    """An exported learner loaded for inference: :meth:`enrol` a support set, :meth:`classify` queries.

    ``format`` is ``"onnx"`` (ONNX Runtime on the CPU, or ``onnx.reference`` when onnxruntime is
    missing) or ``"torch_export"``. ``metadata`` is the parsed ``learner.json``; ``ways`` is
    ``None`` when any number of classes can be enrolled (metric learners), else the head's.
    """

    def __init__(
        self, model_dir: Path, format: str, metadata: dict[str, Any], threads: int = 0
    ) -> None:
        self.model_dir, self.format, self.metadata = model_dir, format, metadata
        self.fingerprint: str = metadata["fingerprint"]
        self.ways: int | None = metadata["ways"]
        self.normalization: str = metadata["normalization"]
        self.state_names: list[str] = list(metadata["state"])
        self.image_size, self.channels = int(metadata["image_size"]), int(metadata["channels"])
        files = metadata["graphs"][format]
        if format == "torch_export":
            self._graphs = {
                g: _TorchExportGraph(model_dir / files[g]) for g in ("enrol", "classify")
            }
        else:
            self._graphs = {
                g: OnnxGraph(model_dir / files[g], threads) for g in ("enrol", "classify")
            }

    # -- checks -----------------------------------------------------------------------------------
    def check_images(self, images: Tensor | np.ndarray, what: str) -> np.ndarray:
        """``images`` as float32 ``[B, C, H, W]`` of this model's format, or a clear ``ValueError``."""
        array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
        expected = (self.channels, self.image_size, self.image_size)
        if array.ndim != 4 or tuple(array.shape[1:]) != expected or len(array) == 0:
            raise ValueError(
                f"{what} must be [B, {self.channels}, {self.image_size}, {self.image_size}] (this "
                f"model's channels and image size), got {tuple(array.shape)}; read image files with "
                "ExportedLearner.read_images, which converts and resizes them."
            )
        return np.ascontiguousarray(array, dtype=np.float32)

    def check_labels(
        self, labels: Tensor | Sequence[int] | np.ndarray, count: int, classes: int | None
    ) -> tuple[np.ndarray, int]:
        """Support labels as int64 ``[S]`` and the number of classes N, or a clear ``ValueError``.

        N is ``classes`` (the number of class names) when given, else the largest label + 1;
        every label must lie in ``0..N-1`` and every class have at least one image.
        """
        array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        if array.ndim != 1 or len(array) != count:
            raise ValueError(
                f"support labels must be one label per support image ([{count}]), got shape "
                f"{tuple(array.shape)}."
            )
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"support labels must be integers, got dtype {array.dtype}.")
        ways = int(classes) if classes is not None else int(array.max()) + 1
        outside = sorted({int(v) for v in array if v < 0 or v >= ways})
        if outside:
            raise ValueError(
                f"support labels {outside[:5]} are out of range: with {ways} classes the labels "
                f"are 0..{ways - 1}; remap them, or give one class name per class."
            )
        missing = sorted(set(range(ways)) - {int(v) for v in array})
        if missing:
            raise ValueError(
                f"support labels {missing[:5]} have no image: every class 0..{ways - 1} needs at "
                "least one support image; add images of those classes, or remap the labels."
            )
        if ways < 2:
            raise ValueError("a support set needs at least 2 classes; it holds only label 0.")
        if self.ways is not None and ways != self.ways:
            raise ValueError(
                f"this {self.metadata['algorithm']} learner's head is {self.ways}-way: enrol "
                f"exactly {self.ways} classes, got {ways} (ProtoNet and MatchingNet learners "
                "enrol any number)."
            )
        return array.astype(np.int64), ways

    def check_state(self, state: EnrolledState) -> None:
        """Raise a clear ``ValueError`` unless ``state`` was enrolled by this model."""
        if not isinstance(state, EnrolledState):
            raise TypeError(
                f"classify takes the EnrolledState that enrol returned, got {type(state).__name__}."
            )
        if state.fingerprint != self.fingerprint:
            raise ValueError(
                f"this state was enrolled by another model (fingerprint {state.fingerprint}, this "
                f"model in {self.model_dir} has {self.fingerprint}); enrol the classes again with "
                "this model."
            )
        if sorted(state.tensors) != sorted(self.state_names):
            raise ValueError(
                f"the state holds {sorted(state.tensors)}, this model needs {self.state_names}; "
                "enrol the classes again with this model."
            )

    # -- the two graphs ---------------------------------------------------------------------------
    def enrol(
        self,
        support_images: Tensor | np.ndarray,
        support_labels: Tensor | Sequence[int] | np.ndarray,
        class_names: Sequence[str] | None = None,
    ) -> EnrolledState:
        """The task state of a support set ``[S, C, H, W]`` with labels ``[S]`` in ``0..N-1``.

        ``class_names`` names the N classes (default ``"0"``, ``"1"``, ...); then labels must lie
        in ``0..len(class_names)-1``.
        """
        images = self.check_images(support_images, "support images")
        classes = None if class_names is None else len(class_names)
        labels, ways = self.check_labels(support_labels, len(images), classes)
        onehot = np.eye(ways, dtype=np.float32)[labels]
        outputs = self._run("enrol", [images, onehot])
        names = (
            [str(n) for n in class_names]
            if class_names is not None
            else list(map(str, range(ways)))
        )
        return EnrolledState(
            dict(zip(self.state_names, outputs, strict=True)), names, self.fingerprint
        )

    def classify(self, state: EnrolledState, query_images: Tensor | np.ndarray) -> Tensor:
        """Logits ``[M, N]`` of query images ``[M, C, H, W]``; column ``k`` is ``state.class_names[k]``."""
        self.check_state(state)
        images = self.check_images(query_images, "query images")
        (logits,) = self._run("classify", [images, *(state.tensors[n] for n in self.state_names)])
        return torch.from_numpy(np.asarray(logits))

    def _run(self, graph: str, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return self._graphs[graph].run(feeds)

    def read_images(self, paths: Sequence[str | Path]) -> Tensor:
        """Image files as the float batch ``[B, C, H, W]`` the graphs take (the data pipeline's
        reading, then the stored ``invert``/``mean``/``std``)."""
        return read_image_files(
            paths,
            self.image_size,
            self.channels,
            invert=bool(self.metadata.get("invert")),
            mean=self.metadata.get("mean"),
            std=self.metadata.get("std"),
        )


def load_exported_learner(
    model_dir: str | Path, format: str | None = None, threads: int = 0
) -> ExportedLearner:
    """Load the exported learner of ``model_dir``; ``format=None`` takes ONNX if it is there."""
    model_dir = Path(model_dir)
    metadata = read_learner_metadata(model_dir)
    present = [
        f
        for f in ("onnx", "torch_export")
        if all((model_dir / name).is_file() for name in metadata["graphs"].get(f, {}).values())
        and f in metadata["graphs"]
    ]
    if format is None:
        if not present:
            raise FileNotFoundError(f"{model_dir} holds none of its graph files; export it again.")
        format = present[0]
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    if format not in present:
        files = ", ".join(GRAPH_FILES[format].values())
        raise FileNotFoundError(
            f"{model_dir} has no {files}; it holds {present or 'no graph'} (export with "
            f"--formats {format})."
        )
    return ExportedLearner(model_dir, format, metadata, threads)


def classify_enrolled(
    model_dir: str | Path,
    paths: Sequence[str | Path],
    enrol: str | Path | None = None,
    state: str | Path | None = None,
    format: str | None = None,
    save_state: str | Path | None = None,
    batch_size: int | None = None,
) -> tuple[list[tuple[str, str, float]], list[str]]:
    """``metakd classify --enrol FOLDER`` (or ``--state FILE``): ``(path, class, probability)`` rows.

    ``enrol`` is a folder of class folders, a few images each (read as the data modules read
    them); ``state`` a file that ``save_state`` wrote before. Queries go through ``classify``
    ``batch_size`` at a time (default 32); the answers do not depend on it, only memory and speed.
    Returns the rows and the class names.
    """
    from lightning_metakd.deploy.labelled import read_class_folders

    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if enrol is None and state is None:
        raise ValueError(
            "an exported learner classifies against enrolled classes: give --enrol FOLDER (a "
            "folder of class folders) or --state FILE (saved with --save_state)."
        )
    if enrol is not None and state is not None:
        raise ValueError("give --enrol FOLDER or --state FILE, not both.")
    learner = load_exported_learner(model_dir, format)
    if enrol is not None:
        meta = learner.metadata
        data = read_class_folders(
            enrol, learner.image_size, learner.channels, bool(meta["invert"]),
            purpose=("metakd classify --enrol", "enrolment"),
        )  # fmt: skip
        images = normalize_images(data.images, meta.get("mean"), meta.get("std"))
        task = learner.enrol(images, data.labels, data.class_names)
    else:
        task = EnrolledState.load(state)
    if save_state is not None:
        task.save(save_state)
    queries = learner.read_images(paths)
    chunks = queries.split(batch_size or 32)
    logits = torch.cat([learner.classify(task, chunk) for chunk in chunks])
    probabilities, indices = logits.softmax(-1).max(-1)
    rows = [
        (str(p), task.class_names[int(i)], float(q))
        for p, i, q in zip(paths, indices, probabilities, strict=True)
    ]
    return rows, task.class_names


__all__ = [
    "EnrolledState",
    "ExportError",
    "ExportedLearner",
    "classify_enrolled",
    "is_learner_export",
    "load_exported_learner",
    "read_learner_metadata",
]

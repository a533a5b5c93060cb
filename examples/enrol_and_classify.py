#!/usr/bin/env python3
"""Few-shot learning on a device: enrol classes from a few images each, then classify, with ONNX
Runtime and numpy alone (Pillow reads the image files). No PyTorch, no lightning-metakd.

The model folder is what ``metakd export --learner CHECKPOINT`` writes: ``enrol.onnx`` (support
images + one-hot labels → the task state: prototypes, support embeddings or an adapted head, and
the support set's BatchNorm statistics), ``classify.onnx`` (query images + that state → logits) and
``learner.json`` (input format, preprocessing, the names of the state tensors, the fingerprint
that ties a state to its model).

Usage::

    python examples/enrol_and_classify.py MODEL_DIR CLASS_FOLDERS IMAGE [IMAGE ...]

``CLASS_FOLDERS`` holds one folder per class with a few images each; every image prints as
``path<TAB>class<TAB>probability``, as ``metakd classify --model MODEL_DIR --enrol CLASS_FOLDERS``
prints it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image

#: The image files a class folder may hold, as the data modules read them (hidden files skipped).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_image(path: Path, meta: dict) -> np.ndarray:
    """One file as ``[C, H, W]`` float32, prepared as the training data was: grey or RGB in
    ``[0, 1]``, inverted if ``invert``, resized (bilinear, antialiased), then ``(x − mean) / std``."""
    size, channels = meta["image_size"], meta["channels"]
    with Image.open(path) as image:
        planes = [image.convert("L")] if channels == 1 else list(image.convert("RGB").split())
    arrays = []
    for plane in planes:
        x = np.asarray(plane, dtype=np.float32) / 255.0
        if meta["invert"]:
            x = 1.0 - x
        if x.shape != (size, size):
            resized = Image.fromarray(x, mode="F").resize((size, size), Image.BILINEAR)
            x = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
        arrays.append(x)
    x = np.stack(arrays)
    if meta["mean"] is not None:
        x = (x - np.float32(meta["mean"])[:, None, None]) / np.float32(meta["std"])[:, None, None]
    return x.astype(np.float32)


def read_classes(root: Path, meta: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every image of ``root/<class>/*``: images ``[S, C, H, W]``, labels ``[S]``, class names."""
    names, images, labels = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and p.name.lower().endswith(IMAGE_SUFFIXES)
        )
        if files:
            images += [read_image(p, meta) for p in files]
            labels += [len(names)] * len(files)
            names.append(folder.name)
    if len(names) < 2:
        sys.exit(f"error: {root} needs at least 2 class folders with images, found {names}.")
    if meta["ways"] is not None and len(names) != meta["ways"]:
        sys.exit(f"error: this model's head is {meta['ways']}-way; give exactly that many classes.")
    return np.stack(images), np.asarray(labels), names


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.split("Usage::")[1].strip().splitlines()[0].strip(), file=sys.stderr)
        return 2
    model_dir, class_root, image_paths = Path(argv[0]), Path(argv[1]), [Path(p) for p in argv[2:]]
    meta = json.loads((model_dir / "learner.json").read_text(encoding="utf-8"))
    session = {
        graph: onnxruntime.InferenceSession(
            str(model_dir / meta["graphs"]["onnx"][graph]), providers=["CPUExecutionProvider"]
        )
        for graph in ("enrol", "classify")
    }

    support, labels, names = read_classes(class_root, meta)
    onehot = np.eye(len(names), dtype=np.float32)[labels]
    outputs = session["enrol"].run(None, {"support_images": support, "support_onehot": onehot})
    state = dict(zip(meta["state"], outputs, strict=True))  # np.savez it with meta["fingerprint"]

    queries = np.stack([read_image(p, meta) for p in image_paths])
    (logits,) = session["classify"].run(None, {"query_images": queries, **state})
    logits = logits - logits.max(-1, keepdims=True)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for path, p in zip(image_paths, probabilities, strict=True):
        k = int(p.argmax())
        print(f"{path}\t{names[k]}\t{p[k]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

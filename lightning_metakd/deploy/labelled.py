"""A user's labelled images: class folders read as the data modules read them, a held-out split,
and a fixed classifier scored on them (accuracy per class, the held-out sheet)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from lightning_metakd.deploy.classifier import FixedClassifier
from lightning_metakd.deploy.sheet import Sheet, prediction_sheet

_LAYOUT = """\
  <data_root>/
  ├── <class A>/   001.png, 002.png, ...   (a few images per class; png, jpg, bmp, ...)
  └── <class B>/   ..."""


class FinetuneError(ValueError):
    """Input that fine-tuning cannot use; the message names the problem and the fix."""


class LabelledImages(NamedTuple):
    """A user's labelled images, read from class folders (:func:`read_class_folders`)."""

    images: Tensor  #: ``[M, C, H, W]`` float in ``[0, 1]``
    labels: Tensor  #: ``[M]`` class indices into ``class_names``
    class_names: list[str]  #: folder names, sorted
    paths: list[Path]  #: the file of each image


def read_class_folders(
    root: str | Path,
    image_size: int,
    channels: int,
    invert: bool = False,
    purpose: tuple[str, str] = ("metakd finetune data_root", "fine-tuning"),
) -> LabelledImages:
    """Every image of ``root/<class>/*`` as one batch, read as ``FolderDataModule`` reads them.

    Classes are the sorted sub-folders that hold images; files are name-sorted; each image is
    converted to ``channels``, inverted if ``invert``, resized (antialiased) to ``image_size``.
    ``purpose``: the argument and the task that error messages name (``metakd classify --enrol``
    reads its classes here too).
    """
    from lightning_metakd.data.folder import check_root, files_dataset, find_class_folders

    argument, task = purpose
    folder = check_root(root, argument, _LAYOUT)
    classes = find_class_folders(folder)
    if len(classes) < 2:
        found = f"only {list(classes)}" if classes else "no sub-folder with images"
        raise FinetuneError(
            f"{str(folder)!r} holds {found}; {task} needs at least 2 class folders with "
            f"images:\n{_LAYOUT}"
        )
    dataset = files_dataset(classes, image_size, channels, invert)
    images = torch.stack([dataset.load_image(i) for i in range(len(dataset))])
    paths = [Path(p) for name in classes for p in classes[name]]
    return LabelledImages(images, torch.as_tensor(dataset.labels), list(classes), paths)


def holdout_split(
    labels: Tensor | Sequence[int],
    class_names: Sequence[str],
    holdout: float | int,
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """Indices ``(train, held_out)`` with part of every class's images held out, seeded.

    ``holdout`` is a fraction in ``[0, 1)`` of each class's images (``round(fraction · n)``, at
    least 1 when the fraction is positive) or an ``int`` count per class; ``0`` holds out nothing.
    Each class's choice is drawn from a generator seeded by ``seed`` and the class name, so it does
    not change when other classes are added or removed. Both lists are sorted.

    Raises:
        FinetuneError: a bad ``holdout``, or a class left without an image to adapt on.

    Example:
        >>> train, held_out = holdout_split([0, 0, 0, 1, 1, 1], ["a", "b"], holdout=1, seed=0)
        >>> len(train), len(held_out), sorted(set(train) | set(held_out)) == list(range(6))
        (4, 2, True)
    """
    is_int = isinstance(holdout, int | np.integer) and not isinstance(holdout, bool)
    is_fraction = isinstance(holdout, float) and 0.0 <= holdout < 1.0
    if not (is_int and holdout >= 0) and not is_fraction:
        raise FinetuneError(
            f"holdout must be a fraction in [0, 1) of each class's images (e.g. 0.2) or a "
            f"non-negative count per class (e.g. 2), got {holdout!r}; 0 holds out nothing."
        )
    labels = np.asarray(labels, dtype=np.int64)
    train: list[int] = []
    held_out: list[int] = []
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        n = len(members)
        count = int(holdout) if is_int else (max(1, round(holdout * n)) if holdout > 0 else 0)
        if n - count < 1:
            raise FinetuneError(
                f"class {name!r} has {n} image(s); holding out {count} leaves none to adapt on. "
                f"Add images to its folder, or lower holdout (holdout: 0 reports no accuracy)."
            )
        rng = np.random.default_rng([seed, zlib.crc32(str(name).encode())])
        chosen = np.zeros(n, dtype=bool)
        chosen[rng.permutation(n)[:count]] = True
        held_out += members[chosen].tolist()
        train += members[~chosen].tolist()
    return sorted(train), sorted(held_out)


# -- scoring a classifier on them -------------------------------------------------------------------
def probabilities(classifier: FixedClassifier, images: Tensor, batch_size: int = 256) -> Tensor:
    """The classifier's class probabilities ``[M, N]`` (softmax of the logits) on the CPU.

    With batch statistics all images go through in one batch (their statistics are the ones a
    deployment would see only if it classified them together); with fixed statistics in chunks.
    """
    device = next(classifier.parameters()).device
    size = len(images) if classifier.statistics == "batch" else batch_size
    chunks = [images[i : i + size] for i in range(0, len(images), size)]
    with torch.inference_mode(False), torch.no_grad():
        return torch.cat([classifier(chunk.to(device)).softmax(-1).cpu() for chunk in chunks])


def accuracy(
    classifier: FixedClassifier, images: Tensor, labels: Tensor, batch_size: int = 256
) -> dict[str, object]:
    """``{"accuracy", "correct", "images", "per_class": {name: {"correct", "images"}}}``.

    The predictions are the argmax of :func:`probabilities` (same batching).
    """
    predicted = probabilities(classifier, images, batch_size).argmax(-1)
    labels = labels.cpu()
    hits = predicted == labels
    per_class = {
        name: {"correct": int(hits[labels == k].sum()), "images": int((labels == k).sum())}
        for k, name in enumerate(classifier.class_names)
    }
    correct = int(hits.sum())
    return {
        "accuracy": correct / len(labels),
        "correct": correct,
        "images": len(labels),
        "per_class": per_class,
    }


def holdout_sheet(
    classifier: FixedClassifier, data: LabelledImages, held_out: Sequence[int], path: Path
) -> Sheet:
    """``holdout.png``: the held-out images with the classifier's prediction and the true class."""
    p = probabilities(classifier, data.images[list(held_out)])
    confidence, predicted = p.max(-1)
    return prediction_sheet(
        path,
        [data.paths[i] for i in held_out],
        [classifier.class_names[int(k)] for k in predicted],
        confidence.tolist(),
        [data.class_names[int(data.labels[i])] for i in held_out],
        title=f"metakd finetune: held-out images of {len(data.class_names)} classes",
    )


__all__ = [
    "FinetuneError",
    "LabelledImages",
    "accuracy",
    "holdout_sheet",
    "holdout_split",
    "probabilities",
    "read_class_folders",
]

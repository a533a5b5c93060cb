"""Images grouped by class: the split that an episode sampler draws tasks from."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from lightning_metakd.data.episode import TaskSpec

#: A callable on one ``[C, H, W]`` float image that returns the transformed image. The result is
#: annotated ``Any`` so that LightningCLI accepts a ``class_path`` of a callable class (e.g.
#: ``lightning_metakd.data.augment.RandomAffine``): with a ``Tensor`` result jsonargparse expects
#: a class whose instances *are* tensors.
Transform = Callable[[Tensor], Any]

#: Bad files named one by one in :func:`check_image_files`'s error; the rest are counted.
BAD_FILES_SHOWN = 20
#: File signatures, to tell a damaged image from a file that is no image at all.
_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP"}
#: Above this many files, :func:`check_image_files` shows a progress bar.
PROGRESS_FILES = 2000


def image_file_problem(path: Path) -> str | None:
    """Why PIL cannot read the image file ``path`` (checked from its header), or ``None``.

    ``Image.open`` identifies the format from the header and ``verify()`` checks the file's
    structure (PNG: every chunk and its CRC) without decoding pixels: about 0.1 ms for an Omniglot
    PNG. A truncated JPEG body can still pass; it is named when it is read.
    """
    try:
        if path.stat().st_size == 0:
            return "an empty file (0 bytes)"
        with Image.open(path) as img:
            img.verify()
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            head = f.read(16)
        size = path.stat().st_size
        kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
        if kind is not None:
            return f"a truncated or damaged {kind} ({size:,} bytes; PIL cannot identify it)"
        return f"not an image ({size:,} bytes starting {head!r})"
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return f"a damaged image ({type(err).__name__}: {err})"
    return None


def check_image_files(paths: Sequence[Path], progress: bool = True) -> None:
    """Raise one ``OSError`` naming every image file in ``paths`` that cannot be read.

    Run at setup so that a text file named ``.png`` or an empty file stops the run before any
    expensive work, not at some training step. Names the first :data:`BAD_FILES_SHOWN` bad files
    with the reason and counts the rest; with ``progress`` shows a tqdm bar above
    :data:`PROGRESS_FILES` files.
    """
    bar = progress and len(paths) > PROGRESS_FILES
    bad = []
    for path in tqdm(paths, desc="Checking image files", unit="file", disable=not bar):
        problem = image_file_problem(path)
        if problem is not None:
            bad.append(f"  {path}: {problem}")
    if bad:
        more = len(bad) - BAD_FILES_SHOWN
        shown = bad[:BAD_FILES_SHOWN] + ([f"  ... and {more} more"] if more > 0 else [])
        raise OSError(
            f"{len(bad)} of {len(paths):,} image files cannot be read; replace or remove them "
            "(a truncated copy, or a non-image file named like an image, is the usual cause):\n"
            + "\n".join(shown)
        )


class ClassDataset(Dataset):
    """The images of one split (train, val or test), grouped by class, loaded task by task.

    Indexing with a :class:`TaskSpec` returns one task ``(support_x, support_y, query_x, query_y,
    classes)`` with labels remapped to ``0..ways-1``; :meth:`Episode.from_tasks` stacks tasks.

    Args:
        images: either a ``uint8`` tensor ``[M, C, H, W]`` (or ``[M, H, W]``) held in memory, or a
            sequence of ``M`` image file paths read lazily with PIL.
        labels: ``M`` class indices in ``0..len(class_names)-1``.
        class_names: a globally unique name per class (used to prove splits are disjoint and to name
            classes in error messages).
        groups: optional named groups of class indices (Omniglot alphabets, KanjiVG radicals): the
            pools that ``grouping`` draws fine-grained tasks from.
        image_size: images are resized (antialiased) to ``image_size x image_size``.
        channels: 1 (grey) or 3 (RGB); file images are converted on load.
        invert: turn black-on-white strokes into white-on-black (Omniglot convention).
        transform: applied to each ``[C, H, W]`` float image in ``[0, 1]`` after resizing. A random
            transform draws from torch's CPU generator, which is seeded for each image from the
            task alone (:func:`view_seeds`) and restored afterwards: the same task gets the same
            views with any number of DataLoader workers and after a resume, and the
            augmentation leaves the random numbers of everything else (dropout, ...) unchanged.
        rotations: 1, or 4 to add the 90°, 180° and 270° rotations of every class as new classes
            (the Omniglot augmentation of Santoro et al. 2016 and Vinyals et al. 2016).
        views: with a ``transform``, a fixed set of ``views`` views per image instead of a new one
            at every draw: each draw picks one of them (from the task's seed), view ``k`` of sample
            ``i`` is always the same image (seeded from ``(i, k)`` alone, :func:`fixed_view_seed`),
            and the sample indices a task returns become view indices ``i * views + k``, so that
            per-image tables (the teacher cache, ``distill/cache.py``) hold one row per view —
            the stored views of Fast Knowledge Distillation (Shen & Xing 2022). ``None``: a new
            view at every draw.

    Example:
        >>> images = torch.randint(0, 255, (20, 1, 28, 28), dtype=torch.uint8)
        >>> ds = ClassDataset(images, [i // 5 for i in range(20)], ["a", "b", "c", "d"])
        >>> sx, sy, qx, qy, classes, s_index, q_index = ds[
        ...     TaskSpec(classes=(2, 0), support=(10, 0), query=(11, 1))
        ... ]
        >>> sx.shape, sy.tolist(), classes.tolist(), s_index.tolist(), q_index.tolist()
        (torch.Size([2, 1, 28, 28]), [0, 1], [2, 0], [10, 0], [11, 1])
    """

    def __init__(
        self,
        images: Tensor | Sequence[str | Path],
        labels: Sequence[int] | Tensor | np.ndarray,
        class_names: Sequence[str],
        groups: Mapping[str, Sequence[int]] | None = None,
        image_size: int | None = None,
        channels: int = 1,
        invert: bool = False,
        transform: Transform | None = None,
        rotations: int = 1,
        views: int | None = None,
    ) -> None:
        if views is not None and views < 1:
            raise ValueError(
                f"views must be at least 1 (or None for a new view per draw), got {views}."
            )
        if rotations not in (1, 4):
            raise ValueError(f"rotations must be 1 or 4, got {rotations}.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}.")
        if isinstance(images, Tensor):
            if images.dtype != torch.uint8:
                raise ValueError(
                    f"In-memory images must be uint8, got {images.dtype}; convert [0, 1] floats "
                    "with (images * 255).round().to(torch.uint8)."
                )
            if images.dim() == 3:
                images = images.unsqueeze(1)
            if images.dim() != 4:
                raise ValueError(
                    f"In-memory images must be [M, C, H, W], got {tuple(images.shape)}."
                )
        self.images = images
        self.base_labels = np.asarray(labels, dtype=np.int64)
        if len(self.base_labels) != len(images):
            raise ValueError(
                f"ClassDataset got {len(images)} images but {len(self.base_labels)} labels; give "
                "one label per image."
            )
        self.base_class_names = list(class_names)
        if len(self.base_labels) and (
            self.base_labels.min() < 0 or self.base_labels.max() >= len(self.base_class_names)
        ):
            raise ValueError(
                f"labels must lie in 0..{len(self.base_class_names) - 1} (one class name each), "
                f"got {self.base_labels.min()}..{self.base_labels.max()}; give a name for every "
                "class."
            )
        self.image_size = image_size
        self.channels = channels
        self.invert = invert
        self.transform = transform
        self.views = views
        self._index(rotations, {k: list(v) for k, v in (groups or {}).items()})

    #: The memory that made views (``views``) may keep per process; past it they are made again.
    #: KanjiVG's 89,380 training images with 4 views at 28 px keep 1.1 GB.
    stored_views_bytes: int = 2 * 1024**3

    def _index(self, rotations: int, base_groups: Mapping[str, Sequence[int]]) -> None:
        """Derive the (possibly rotated) class index: names, labels, members of each class, groups."""
        r = self.rotations = rotations
        self.class_names = [
            name if k == 0 else f"{name}@rot{90 * k}"
            for name in self.base_class_names
            for k in range(r)
        ]
        self.labels = (self.base_labels[:, None] * r + np.arange(r)[None, :]).reshape(-1)
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        self.indices_by_class: list[np.ndarray] = np.split(order, np.cumsum(counts)[:-1])
        self.base_groups = {name: list(members) for name, members in base_groups.items()}
        self.groups: dict[str, list[int]] = {
            name: [c * r + k for c in members for k in range(r)]
            for name, members in base_groups.items()
        }

    def with_rotations(self, rotations: int = 4) -> ClassDataset:
        """A copy whose classes are multiplied by their 90° rotations (subclasses keep their type)."""
        if rotations not in (1, 4):
            raise ValueError(f"rotations must be 1 or 4, got {rotations}.")
        rotated = copy.copy(self)
        rotated.__dict__.pop("_views_made", None)  # its sample indices name other images
        rotated._index(rotations, self.base_groups)
        return rotated

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def image_files(self) -> list[Path]:
        """The files this split reads its images from; empty when they are held elsewhere.

        Images in memory, or read by a subclass's own :meth:`read_image`, have no files to check.
        """
        if isinstance(self.images, Tensor) or type(self).read_image is not ClassDataset.read_image:
            return []
        return [Path(p) for p in self.images]

    def read_image(self, base: int) -> Tensor:
        """Stored image ``base`` as a float ``[C, H, W]`` tensor in ``[0, 1]``, as it is stored.

        Subclasses that keep images elsewhere override this; :meth:`load_image` does the rest.
        """
        if isinstance(self.images, Tensor):
            return self.images[base].float().div_(255.0)
        return self._read_file(Path(self.images[base]))

    def load_image(self, index: int) -> Tensor:
        """Sample ``index`` as a float ``[C, H, W]`` image in ``[0, 1]``, resized, before ``transform``."""
        base, rotation = divmod(int(index), self.rotations)
        image = self.read_image(base)
        if image.shape[0] != self.channels:
            image = (
                image.expand(self.channels, -1, -1) if image.shape[0] == 1 else image.mean(0, True)
            )
        if self.invert:
            image = 1.0 - image
        if self.image_size is not None and image.shape[-2:] != (self.image_size, self.image_size):
            image = F.interpolate(
                image[None],
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
            )[0].clamp_(0.0, 1.0)
        if rotation:
            image = torch.rot90(image, rotation, dims=(1, 2))
        return image

    def _read_file(self, path: Path) -> Tensor:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                array = np.asarray(img, dtype=np.uint8).copy()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise OSError(
                f"Cannot read image file {path}: {err}. Remove or replace the file (a truncated "
                "copy or a non-image file in the data folder is the usual cause)."
            ) from err
        tensor = torch.from_numpy(array)
        tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
        return tensor.float().div_(255.0)

    def __getitem__(self, spec: TaskSpec) -> tuple[Tensor, ...]:
        if not isinstance(spec, TaskSpec):
            raise TypeError(
                f"ClassDataset is indexed by a TaskSpec (from an EpisodeSampler), got {type(spec).__name__}."
            )
        ways = spec.ways

        seeds = view_seeds(spec) if self.transform is not None else None
        fixed = self.views if seeds is not None else None
        # With fixed views, the task's seed of an image only picks which of its views it shows.
        picks = seeds % fixed if fixed is not None else None

        def load(indices: Sequence[int], first: int) -> Tensor:
            if fixed is not None:
                views = [
                    self._stored_view(int(i), int(picks[first + j])) for j, i in enumerate(indices)
                ]
                return torch.stack(views)
            images = [self.load_image(i) for i in indices]
            if seeds is not None:
                images = [
                    self._transformed(img, int(seeds[first + j])) for j, img in enumerate(images)
                ]
            return torch.stack(images)

        def index(indices: Sequence[int], first: int) -> Tensor:
            index = torch.tensor(indices, dtype=torch.long)
            if fixed is None:
                return index
            view = torch.from_numpy(picks[first : first + len(indices)].astype(np.int64))
            return index * fixed + view

        support_y = torch.arange(ways).repeat_interleave(spec.shots)
        query_y = torch.arange(ways).repeat_interleave(spec.queries)
        classes = torch.tensor(spec.classes, dtype=torch.long)
        support_x, query_x = load(spec.support, 0), load(spec.query, len(spec.support))
        indices = [index(spec.support, 0), index(spec.query, len(spec.support))]
        return support_x, support_y, query_x, query_y, classes, *indices

    def _stored_view(self, index: int, view: int) -> Tensor:
        """View ``view`` of sample ``index``: made once, then kept while the views kept stay under
        :attr:`stored_views_bytes` (in this process; a persistent DataLoader worker keeps its
        own), and made again past it — the same image either way."""
        store = self.__dict__.get("_views_made")
        if store is None or store.transform is not self.transform or store.views != self.views:
            store = self._views_made = _ViewStore(self.transform, self.views)
        key = index * self.views + view
        made = store.made.get(key)
        if made is None:
            made = self._transformed(self.load_image(index), fixed_view_seed(index, view))
            size = made.element_size() * made.nelement()
            if store.size + size <= self.stored_views_bytes:
                store.made[key] = made
                store.size += size
        return made

    def _transformed(self, image: Tensor, seed: int) -> Tensor:
        # Only the CPU generator is forked and seeded: torch.manual_seed would reseed CUDA too.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(image)


@dataclass
class _ViewStore:
    """The views a :class:`ClassDataset` made with ``transform`` and ``views`` (by view index),
    and the bytes they hold."""

    transform: Transform | None
    views: int | None
    made: dict[int, Tensor] = field(default_factory=dict)
    size: int = 0


def fixed_view_seed(index: int, view: int) -> int:
    """The seed of view ``view`` of sample ``index`` when a split keeps a fixed set of views per
    image (``ClassDataset(views=...)``): a function of the two alone, so the view is the same image
    in every task, epoch, worker and resume.

    Example:
        >>> fixed_view_seed(10, 3) == fixed_view_seed(10, 3) != fixed_view_seed(10, 4)
        True
    """
    return int(np.random.SeedSequence([int(index), int(view), 0x56494557]).generate_state(1)[0])


def view_seeds(spec: TaskSpec) -> np.ndarray:
    """One seed per image of the task ``spec`` (support, then query): a function of the task alone.

    Hashed from the classes and sample indices with :class:`numpy.random.SeedSequence`, so the
    random view of an image depends on which task it is loaded for (a new task each time it is
    drawn again), never on the DataLoader worker that loads it, the number of workers, the epoch
    a resume starts in or other random draws of the process.

    Example:
        >>> spec = TaskSpec(classes=(2, 0), support=(10, 0), query=(11, 1))
        >>> seeds = view_seeds(spec)
        >>> len(seeds), bool((seeds == view_seeds(spec)).all())
        (4, True)
    """
    entropy = [len(spec.classes), *spec.classes, len(spec.support), *spec.support, *spec.query]
    return np.random.SeedSequence(entropy).generate_state(len(spec.support) + len(spec.query))

"""Episodes from learn2learn data: ``MetaDataset`` s, ``(image, label)`` datasets, ``Taskset`` s.

learn2learn (Arnold et al. 2020, "learn2learn: A Library for Meta-Learning Research") is an optional
extra: nothing here imports it until a :class:`Learn2LearnDataModule` is constructed.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from lightning_metakd.data.datamodule import EpisodicDataModule
from lightning_metakd.data.dataset import ClassDataset
from lightning_metakd.data.learn2learn_datasets import (
    ShapeMismatch,
    as_image,
    as_meta_dataset,
    dataset_root,
    label_name,
    to_class_dataset,
)
from lightning_metakd.data.sampler import EpisodeSampler
from lightning_metakd.data.splits import SPLITS, Split

_INSTALL_HINT = (
    "learn2learn is an optional extra of lightning-metakd. Install learn2learn 0.2.0 with "
    "`python scripts/install_learn2learn.py` from the lightning-metakd repository (needed on "
    "Python >= 3.11, where its PyPI source no longer compiles) or, on Python < 3.11, "
    "`pip install lightning-metakd[learn2learn]`."
)
_STREAMS = {"train": 0, "val": 1, "test": 2}

SplitSource = Any  # a learn2learn MetaDataset or Taskset, or a torch Dataset of (image, label)


def require_learn2learn(what: str = "This feature") -> Any:
    """The ``learn2learn`` module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("learn2learn")
    except ImportError as err:
        raise ImportError(
            f"{what} needs learn2learn, which is not importable ({err}). {_INSTALL_HINT}"
        ) from err


class Learn2LearnDataModule(EpisodicDataModule):
    """Serves :class:`Episode` s from data prepared with learn2learn.

    Each split (``train``, ``val``, ``test``) is one of:

    - a learn2learn ``MetaDataset`` (or ``FilteredMetaDataset``, ``UnionMetaDataset``), or a plain
      torch ``Dataset`` of ``(image, label)`` pairs, which is wrapped into a ``MetaDataset``. It is
      turned into a :class:`ClassDataset` and *our* :class:`EpisodeSampler` draws the tasks, so
      the fixed validation/test lists, DDP sharding, ``grouping`` and ``rotations`` behave exactly
      as for every other source.
    - a learn2learn ``Taskset`` (``TaskDataset``): its own task transforms (``NWays``, ``KShots``,
      ``FilterLabels``, ``RandomClassRotation``, ...) choose the tasks. Task ``i`` is drawn with
      Python's ``random`` and torch's generator seeded from ``(seed, split, epoch, i)`` inside a
      scope that restores both afterwards, so the lists are reproducible, validation/test lists
      are fixed, and DDP ranks shard one global list (rank ``r`` takes tasks ``r, r + W, ...``),
      with or without worker processes. The taskset's own ``num_tasks`` and caching are not used.
      Each task is then put in :class:`Episode` form: samples are grouped by the label the taskset
      gives them, labels are renumbered ``0..ways-1`` in increasing order of that label, the first
      ``shots`` samples of each class are the support and the next ``queries`` the query. The
      taskset must therefore yield ``ways`` classes with exactly ``shots + queries`` samples each
      (``NWays(n=ways), KShots(k=shots + queries)``); anything else raises an error naming the fix.
      Images are returned as the taskset makes them (its own normalisation is kept), cast to float,
      ``uint8`` scaled to ``[0, 1]``, and resized to ``image_size``.

    **Storage of MetaDataset splits.** ``storage="memory"`` reads every item once and keeps the
    split as a ``uint8`` tensor (fast episodes; all images of a split must share one shape).
    ``storage="lazy"`` keeps a reference to the dataset and reads the ``shots + queries`` items of
    a task when it is loaded (for data sets too large for memory; the dataset's own transform runs
    on every read). ``"auto"`` (default) picks memory when the split fits in ``max_memory_mb`` and
    its images share a shape. Items may be PIL images, ``uint8`` tensors/arrays, or float tensors
    in ``[0, 1]`` or ``[0, 255]`` (``pixel_range``, detected from the first item by default).
    In memory, normalised images (negative values) are refused: drop ``Normalize`` from the
    dataset and pass it as ``train_transform``/``eval_transform``.

    **Class identity across splits.** A class is named ``"<label>"`` when every split comes from
    one underlying dataset (e.g. ``FilteredMetaDataset`` s or ``Subset`` s of one data set; found by
    following ``.dataset`` attributes), so a class present in two splits is caught as an overlap.
    When the splits are separate datasets whose labels restart at 0 (learn2learn's
    ``MiniImagenet(mode=...)``), names are ``"<split>:<label>"``. ``shared_labels`` overrides the
    guess.

    **No benchmark names.** learn2learn's ``vision.benchmarks.get_tasksets(name, root=...)``
    constructs its data sets with ``download=True`` hard-coded and has no switch to turn it off, so
    it may reach the network; this module does not call it. Build the data sets yourself with
    ``download=False`` and pass them in (see the example).

    Args:
        train, val, test: one source per split (see above).
        storage: ``"auto"``, ``"memory"`` or ``"lazy"`` (MetaDataset splits only).
        max_memory_mb: the ``"auto"`` threshold, in MiB of ``uint8`` pixels per split.
        channels: output channels (1 or 3); default: those of the train split's first image.
        invert: turn black-on-white images into white-on-black (Omniglot convention).
        pixel_range: ``1.0`` or ``255.0``, the maximum of float pixel values; default: guessed
            from the first item of each split.
        shared_labels: whether a label means the same class in every split (see above).
        **kwargs: the task shape, seeds and loader settings of :class:`EpisodicDataModule`.

    Example::

        import learn2learn as l2l
        splits = {m: l2l.vision.datasets.MiniImagenet("~/data", mode=m, download=False)
                  for m in ("train", "validation", "test")}
        dm = Learn2LearnDataModule(splits["train"], splits["validation"], splits["test"],
                                   ways=5, shots=1, image_size=84)
        dm.setup(); episode = next(iter(dm.train_dataloader()))
        episode.support_x.shape
        # torch.Size([32, 5, 3, 84, 84])
    """

    def __init__(
        self,
        train: SplitSource,
        val: SplitSource,
        test: SplitSource,
        storage: Literal["auto", "memory", "lazy"] = "auto",
        max_memory_mb: float = 2048.0,
        channels: int | None = None,
        invert: bool = False,
        pixel_range: float | None = None,
        shared_labels: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self._l2l = require_learn2learn("Learn2LearnDataModule")
        super().__init__(**kwargs)
        if storage not in ("auto", "memory", "lazy"):
            raise ValueError(f"storage must be 'auto', 'memory' or 'lazy', got {storage!r}.")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3 (or None to infer), got {channels}.")
        if pixel_range not in (None, 1.0, 255.0):
            raise ValueError(
                f"pixel_range must be 1.0 or 255.0 (or None to infer), got {pixel_range}."
            )
        self.sources: dict[str, SplitSource] = {"train": train, "val": val, "test": test}
        self.storage, self.max_memory_mb = storage, max_memory_mb
        self.channels_arg, self.invert, self.pixel_range = channels, invert, pixel_range
        self.shared_labels = shared_labels
        self.tasksets: dict[str, Any] = {}
        self.meta_datasets: dict[str, Any] = {}
        for split, source in self.sources.items():
            if isinstance(source, self._l2l.data.Taskset):
                self.tasksets[split] = source
                self.meta_datasets[split] = source.dataset
            elif isinstance(source, Dataset):
                meta = source if isinstance(source, self._l2l.data.MetaDataset) else None
                self.meta_datasets[split] = (
                    meta if meta is not None else as_meta_dataset(self._l2l, source)
                )
            else:
                raise TypeError(
                    f"The {split} split must be a learn2learn MetaDataset or Taskset, or a torch "
                    f"Dataset of (image, label) pairs; got {type(source).__name__}."
                )
        if rotations := kwargs.get("rotations", False):
            if "train" in self.tasksets:
                raise ValueError(
                    "rotations=True cannot be applied to a learn2learn Taskset; add "
                    "l2l.vision.transforms.RandomClassRotation to its task transforms instead."
                )
            if storage == "lazy":
                raise ValueError(
                    "rotations=True needs storage='memory' (or 'auto'); with lazy storage add the "
                    "rotation to the dataset's transform instead."
                )
        self._rotations_requested = rotations
        self.save_hyperparameters(
            ignore=["train", "val", "test", "train_transform", "eval_transform"]
        )

    # ----------------------------------------------------------------------------------------------
    # Splits

    def build_splits(self) -> dict[str, ClassDataset]:
        """One :class:`ClassDataset` per split; for Taskset splits a lazy view used for checks."""
        shared = self.shared_labels
        if shared is None:
            roots = {id(dataset_root(m)) for m in self.meta_datasets.values()}
            shared = len(roots) == 1
        channels = self.channels_arg
        splits: dict[str, ClassDataset] = {}
        self._prefixes = {split: "" if shared else f"{split}:" for split in SPLITS}
        for split in SPLITS:
            meta = self.meta_datasets[split]
            prefix = self._prefixes[split]
            lazy = split in self.tasksets or self._choose_lazy(split, meta)
            args = (prefix, self.image_size, channels, self.invert, self.pixel_range, split)
            try:
                splits[split] = to_class_dataset(meta, lazy, *args)
            except ShapeMismatch:
                if self.storage != "auto" or self._rotations_requested:
                    raise
                splits[split] = to_class_dataset(meta, True, *args)
            channels = channels or splits[split].channels
        return splits

    def _choose_lazy(self, split: str, meta: Any) -> bool:
        if self.storage != "auto":
            return self.storage == "lazy"
        if len(meta) == 0:
            return False
        first = as_image(meta[0][0], split)
        megabytes = first.numel() * len(meta) / 2**20
        if megabytes > self.max_memory_mb:
            if self._rotations_requested and split == "train":
                raise ValueError(
                    f"The train split needs {megabytes:.0f} MiB in memory (> max_memory_mb="
                    f"{self.max_memory_mb:.0f}), but rotations=True needs in-memory storage. Raise "
                    "max_memory_mb or add the rotation to the dataset's transform instead."
                )
            return True
        return False

    # ----------------------------------------------------------------------------------------------
    # Taskset splits: our seeded keys, their task descriptions

    def setup(self, stage: str | None = None) -> None:
        first_time = not self.splits
        super().setup(stage)
        if first_time:
            for split in self.tasksets:  # fail at setup, not mid-epoch, if the task shape is wrong
                self._taskset_tasks(split)[TaskKey(self.seed, _STREAMS[split], -1, 0)]

    def sampler(self, split: Split) -> EpisodeSampler | TaskKeySampler:
        """Our :class:`EpisodeSampler`, or for a Taskset split a :class:`TaskKeySampler`."""
        if split not in self.tasksets:
            return super().sampler(split)
        self._require_setup()
        world, rank = self._world()
        train = split == "train"
        return TaskKeySampler(
            self.num_tasks(split),
            fixed=not train,
            seed=self.train_seed if train else self.seed,
            stream=_STREAMS[split],
            num_replicas=world,
            rank=rank,
        )

    def task_dataset(self, split: Split) -> Any:
        """Our ClassDataset, or for a Taskset split the tasks its sampler's keys select."""
        if split not in self.tasksets:
            return super().task_dataset(split)
        return self._taskset_tasks(split)

    def _taskset_tasks(self, split: str) -> TasksetTasks:
        self._require_setup()
        train = split == "train"
        view = self.splits[split]
        return TasksetTasks(
            self.tasksets[split],
            class_index={name: i for i, name in enumerate(view.class_names)},
            prefix=self._prefixes[split],
            ways=self.ways if train else self.test_ways,
            shots=self.shots if train else self.test_shots,
            queries=self.queries if train else self.test_queries,
            image_size=self.image_size,
            channels=self.channels,
            transform=view.transform,
            split=split,
        )


class TaskKey(NamedTuple):
    """Names one task of a Taskset split: task ``index`` of ``epoch`` (``-1``: a fixed list)."""

    seed: int
    stream: int
    epoch: int
    index: int


class TaskKeySampler(DistributedSampler):
    """Yields :class:`TaskKey` s: the Taskset counterpart of :class:`EpisodeSampler`.

    ``fixed=True`` yields the same ``num_tasks`` keys at every evaluation; otherwise fresh keys per
    epoch (:meth:`set_epoch`). Rank ``r`` of ``W`` keeps keys ``r, r + W, ...`` of the global list.
    Like :class:`EpisodeSampler` it subclasses ``DistributedSampler`` only so that Lightning
    does not wrap it again.
    """

    def __init__(
        self,
        num_tasks: int,
        fixed: bool,
        seed: int,
        stream: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside a world of {num_replicas} processes.")
        if not fixed and num_tasks % num_replicas:
            raise ValueError(
                f"{num_tasks} training tasks cannot be split evenly over {num_replicas} processes "
                f"(num_nodes × devices); make meta_batch_size a multiple of {num_replicas}."
            )
        self.num_tasks, self.fixed = num_tasks, fixed
        self.shuffle, self.drop_last = not fixed, False
        self.seed, self.stream = seed, stream
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def __iter__(self) -> Iterator[TaskKey]:
        epoch = -1 if self.fixed else self.epoch
        for i in range(self.rank, self.num_tasks, self.num_replicas):
            yield TaskKey(self.seed, self.stream, epoch, i)

    def __len__(self) -> int:
        return len(range(self.rank, self.num_tasks, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class TasksetTasks(Dataset):
    """Loads the task of a :class:`TaskKey` from a learn2learn Taskset, in :class:`Episode` form.

    Returns ``(support_x, support_y, query_x, query_y, classes)`` like :class:`ClassDataset`:
    ``support_x`` ``[ways * shots, C, H, W]`` float, labels ``0..ways-1`` class-major, ``classes``
    the split's class index behind each label.
    """

    def __init__(
        self,
        taskset: Any,
        class_index: Mapping[str, int],
        prefix: str,
        ways: int,
        shots: int,
        queries: int,
        image_size: int | None,
        channels: int,
        transform: Callable[[Tensor], Tensor] | None,
        split: str,
    ) -> None:
        self.taskset, self.class_index, self.prefix = taskset, class_index, prefix
        self.ways, self.shots, self.queries = ways, shots, queries
        self.image_size, self.channels, self.transform, self.split = (
            image_size,
            channels,
            transform,
            split,
        )
        transforms = taskset.task_transforms
        first = transforms[0] if isinstance(transforms, Sequence) and transforms else transforms
        # Descriptions index the dataset their transforms were built on, not always taskset.dataset.
        self.indexed = getattr(first, "dataset", None) or taskset.dataset

    def __getitem__(self, key: TaskKey) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if not isinstance(key, TaskKey):
            raise TypeError(f"TasksetTasks is indexed by a TaskKey, got {type(key).__name__}.")
        with torch.random.fork_rng(devices=[]):
            state = random.getstate()
            try:
                random.seed(f"lightning-metakd/{key.seed}/{key.stream}/{key.epoch}/{key.index}")
                torch.manual_seed(random.getrandbits(63))
                description = self.taskset.sample_task_description()
                task = self.taskset.get_task(description)
            finally:
                random.setstate(state)
        if not (
            isinstance(task, Sequence)
            and len(task) >= 2
            and all(isinstance(t, Tensor) for t in task[:2])
        ):
            raise TypeError(
                f"The {self.split} Taskset must yield (images, labels) tensors (the default "
                f"task_collate does); got {type(task).__name__}."
            )
        images, labels = task[0], task[1].reshape(-1)
        classes = [self.indexed.indices_to_labels[dd.index] for dd in description]
        return self._to_episode_task(images, labels, classes)

    def _to_episode_task(
        self, images: Tensor, labels: Tensor, classes: list[Hashable]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        values = labels.unique(sorted=True)
        need = self.shots + self.queries
        counts = [int((labels == v).sum()) for v in values]
        if len(values) != self.ways or any(c != need for c in counts):
            raise ValueError(
                f"A task of the {self.split} Taskset has {len(values)} classes with {counts} "
                "samples; "
                f"this DataModule needs {self.ways} classes with shots + queries = {self.shots} + "
                f"{self.queries} = {need} samples each. Build the Taskset with "
                f"NWays(n={self.ways}) and KShots(k={need}), or change ways/shots/queries."
            )
        support, query, task_classes = [], [], []
        for value in values:
            members = (labels == value).nonzero().flatten()
            support.append(members[: self.shots])
            query.append(members[self.shots :])
            name = self.prefix + label_name(classes[int(members[0])])
            if name not in self.class_index:
                raise ValueError(
                    f"A task of the {self.split} Taskset uses class {name!r}, which is not in that "
                    "split's dataset: its task transforms were built on a different dataset than "
                    "Taskset.dataset (learn2learn's own omniglot benchmark does this), so its "
                    "tasks are not class-disjoint across splits. Build the transforms on "
                    "Taskset.dataset."
                )
            task_classes.append(self.class_index[name])
        x = self._prepare(images)
        support_y = torch.arange(self.ways).repeat_interleave(self.shots)
        query_y = torch.arange(self.ways).repeat_interleave(self.queries)
        return (
            x[torch.cat(support)],
            support_y,
            x[torch.cat(query)],
            query_y,
            torch.tensor(task_classes, dtype=torch.long),
        )

    def _prepare(self, images: Tensor) -> Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4:
            raise ValueError(f"Taskset images must be [n, C, H, W], got {tuple(images.shape)}.")
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        if self.image_size is not None and x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            )
        if self.transform is not None:
            x = torch.stack([self.transform(img) for img in x])
        return x

"""The episodic LightningDataModule that every data source builds on."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lightning_metakd.data.dataset import ClassDataset, Transform
from lightning_metakd.data.episode import Episode
from lightning_metakd.data.loader import EpisodeLoader, random_states
from lightning_metakd.data.sampler import EpisodeSampler

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
_STREAMS = {"train": 0, "val": 1, "test": 2}


class EpisodicDataModule(L.LightningDataModule):
    """Serves N-way K-shot episodes from three class-disjoint splits.

    A data source subclasses it and implements :meth:`build_splits`, returning one
    :class:`ClassDataset` per split (and optionally :meth:`prepare_data` for one-off work such as
    rendering a cache). Everything else — samplers, DDP sharding, fixed evaluation episodes, checks —
    lives here once.

    Every batch is an :class:`Episode` of ``meta_batch_size`` tasks (divided over DDP processes).
    Training draws ``steps_per_epoch`` fresh meta-batches per epoch; validation and test use fixed,
    seeded lists of ``val_episodes`` and ``test_episodes`` tasks, the same at every evaluation.

    Resuming: a run resumed from any checkpoint, mid-epoch included, trains on the episodes the
    uninterrupted run would have, in the same order, with the same random states: the training
    :class:`~lightning_metakd.data.loader.EpisodeLoader` is saved and restored by Lightning, and
    :meth:`state_dict` holds the process's random states, put back before the first batch trained
    after the resume. Loaders draw their worker seeds from their own generator, never from the
    global one, so evaluating never shifts the random numbers that training uses.

    Args:
        ways, shots, queries: training task shape (N-way K-shot with Q queries per class).
        meta_batch_size: tasks per optimisation step, over all processes of all nodes (rounded up
            to a multiple of the number of processes, with a warning; see :meth:`tasks_per_process`).
        test_ways, test_shots, test_queries: validation/test task shape; default to the training one.
        steps_per_epoch: training meta-batches per epoch.
        val_episodes, test_episodes: number of fixed validation and test tasks (at least one per
            process).
        grouping: ``"none"`` draws a task's classes from the whole split; the source's group name
            (``"radical"`` for KanjiVG, ``"alphabet"`` for Omniglot, ``"group"`` always) draws them
            from one group — fine-grained tasks.
        rotations: add the 90° rotations of each training class as new classes (Omniglot practice).
        num_workers: DataLoader worker processes.
        seed: seeds the class split (where the source makes one) and every episode list.
        image_size: images are resized to ``image_size x image_size``.
        train_transform, eval_transform: optional callables on ``[C, H, W]`` float images.

    Example:
        >>> dm = KanjiDataModule(ways=5, shots=1, grouping="radical")  # doctest: +SKIP
        >>> dm.setup("fit"); episode = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    """

    #: The name of this source's class groups, accepted as a ``grouping`` value besides ``"group"``.
    group_name: str = "group"

    def __init__(
        self,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        meta_batch_size: int = 32,
        test_ways: int | None = None,
        test_shots: int | None = None,
        test_queries: int | None = None,
        steps_per_epoch: int = 100,
        val_episodes: int = 100,
        test_episodes: int = 600,
        grouping: str = "none",
        rotations: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int = 28,
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("ways", ways), ("shots", shots), ("meta_batch_size", meta_batch_size),
            ("steps_per_epoch", steps_per_epoch), ("val_episodes", val_episodes),
            ("test_episodes", test_episodes), ("image_size", image_size),
        ):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if queries < 1:
            raise ValueError(f"queries must be at least 1, got {queries}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be non-negative, got {num_workers}.")
        if grouping not in ("none", "group", self.group_name):
            raise ValueError(f"grouping must be 'none' or '{self.group_name}', got {grouping!r}.")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.test_ways = test_ways or ways
        self.test_shots = test_shots or shots
        self.test_queries = test_queries or queries
        self.meta_batch_size = meta_batch_size
        self.steps_per_epoch = steps_per_epoch
        self.val_episodes, self.test_episodes = val_episodes, test_episodes
        self.grouping = grouping
        self.rotations = rotations
        self.num_workers = num_workers
        self.seed = seed
        self.image_size = image_size
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.splits: dict[str, ClassDataset] = {}
        self._resumed_random_states: Mapping[str, Any] | None = None
        self._warned_meta_batch = False
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])

    @abstractmethod
    def build_splits(self) -> dict[str, ClassDataset]:
        """Return ``{"train": ..., "val": ..., "test": ...}``, each a :class:`ClassDataset`.

        Called from :meth:`setup`. Implementations should honour ``self.image_size`` and
        ``self.seed``; the base class applies ``rotations`` and the transforms.
        """

    @property
    def channels(self) -> int:
        """Image channels of this source (after :meth:`setup`)."""
        self._require_setup()
        return self.splits["train"].channels

    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup before it restores a checkpoint: random states of an older restore
        # (e.g. a `test` with ckpt_path) must not leak into this run.
        self._resumed_random_states = None
        if self.splits:
            return
        splits = self.build_splits()
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.build_splits() returned no {missing} split(s)."
            )
        names = {s: set(splits[s].base_class_names) for s in SPLITS}
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1 :]:
                shared = names[a] & names[b]
                if shared:
                    raise ValueError(
                        f"The {a} and {b} splits share {len(shared)} class(es), e.g. "
                        f"{sorted(shared)[:3]}; class splits must be disjoint."
                    )
        if self.rotations:
            splits["train"] = splits["train"].with_rotations(4)
        splits["train"].transform = self.train_transform or splits["train"].transform
        for s in ("val", "test"):
            splits[s].transform = self.eval_transform or splits[s].transform
        self.splits = splits
        # Build every sampler once so that bad ways/shots fail here, before any training starts.
        for split in SPLITS:
            self.sampler(split)

    def _require_setup(self) -> None:
        if not self.splits:
            raise RuntimeError(f"Call {type(self).__name__}.setup() before asking for data.")

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _processes(self) -> str:
        """The world in words for messages: ``"4 processes (num_nodes=2 × devices=2)"``.

        Users set ``num_nodes`` and ``devices``, not the world size, so messages name both.
        """
        world, _ = self._world()
        trainer = self.trainer
        if trainer is not None and trainer.num_nodes * trainer.num_devices == world:
            nodes, devices = trainer.num_nodes, trainer.num_devices
            return f"{world} processes (num_nodes={nodes} × devices={devices})"
        return f"{world} processes (num_nodes × devices)"

    def tasks_per_process(self) -> int:
        """Tasks each process takes per step: ``meta_batch_size`` split over the DDP processes.

        The processes are all of them, on every node: ``num_nodes × devices``. When
        ``meta_batch_size`` does not divide evenly over them (``1`` on 2 GPUs, say, or ``8`` on 3
        nodes of 4 GPUs) every process takes ``ceil(meta_batch_size / processes)`` tasks, so that
        the same config runs on any number of devices and nodes; a step then averages
        ``tasks_per_process() * processes`` tasks, more than asked for, and a warning says so once.
        """
        world, _ = self._world()
        per_process = math.ceil(self.meta_batch_size / world)
        if per_process * world != self.meta_batch_size and not self._warned_meta_batch:
            self._warned_meta_batch = True
            rank_zero_warn(
                f"meta_batch_size={self.meta_batch_size} does not divide over {self._processes()}: "
                f"each process takes {per_process} task(s) per step, so a step averages "
                f"{per_process * world} tasks, not {self.meta_batch_size}. Set meta_batch_size to "
                f"a multiple of {world} to choose the meta-batch exactly."
            )
        return per_process

    def num_tasks(self, split: Split) -> int:
        """Tasks per training epoch, or in the fixed validation/test list, over all processes.

        An evaluation list must give every process at least one episode. Lightning refuses an
        empty evaluation loader on the rank that has it only ("within local rank has zero length"),
        and the other ranks then fail on the lost peer (gloo: "Connection closed by peer"), so
        fewer episodes than processes is an error here instead, on every rank at once, in setup.
        """
        world, _ = self._world()
        if split == "train":
            return self.steps_per_epoch * self.tasks_per_process() * world
        episodes = {"val": self.val_episodes, "test": self.test_episodes}[split]
        if episodes < world:
            raise ValueError(
                f"{split}_episodes={episodes} is fewer than the {self._processes()}: every "
                f"process needs at least one {split} episode. Set {split}_episodes to at least "
                f"{world}."
            )
        return episodes

    def task_dataset(self, split: Split) -> Dataset:
        """What the DataLoader indexes with the sampler's items: here the split's ClassDataset."""
        return self.splits[split]

    def sampler(self, split: Split) -> EpisodeSampler:
        """The episode sampler of ``split`` for this process."""
        self._require_setup()
        world, rank = self._world()
        train = split == "train"
        num_tasks = self.num_tasks(split)
        return EpisodeSampler(
            self.splits[split],
            ways=self.ways if train else self.test_ways,
            shots=self.shots if train else self.test_shots,
            queries=self.queries if train else self.test_queries,
            num_tasks=num_tasks,
            fixed=not train,
            seed=self.seed,
            stream=_STREAMS[split],
            grouping=self.grouping != "none",
            num_replicas=world,
            rank=rank,
        )

    def dataloader(self, split: Split) -> DataLoader:
        """A DataLoader of :class:`Episode` s for ``split`` (what the ``*_dataloader`` hooks return).

        An :class:`~lightning_metakd.data.loader.EpisodeLoader`: Lightning resumes it mid-epoch.
        """
        sampler = self.sampler(split)
        seed = int(np.random.SeedSequence([self.seed, _STREAMS[split]]).generate_state(1)[0])
        loader = EpisodeLoader(
            self.task_dataset(split),
            sampler=sampler,
            batch_size=self.tasks_per_process(),
            collate_fn=Episode.from_tasks,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        if split == "train" and self._resumed_random_states is not None:
            loader.resume_random_states(self._resumed_random_states)
            self._resumed_random_states = None
        return loader

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: the process's random states when it was written."""
        return {"random_states": random_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's random states for the next training loader (see the class docs)."""
        self._resumed_random_states = state_dict.get("random_states")

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        """The fixed test episodes: ``metakd predict`` labels their query sets."""
        return self.dataloader("test")

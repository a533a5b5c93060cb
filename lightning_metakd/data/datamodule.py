"""The episodic LightningDataModule that every data source builds on."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lightning_metakd.data.dataset import ClassDataset, Transform
from lightning_metakd.data.episode import Episode
from lightning_metakd.data.loader import EpisodeLoader, random_states
from lightning_metakd.data.sampler import EpisodeSampler
from lightning_metakd.data.splits import Split, checked_splits, split_summary

_STREAMS = {"train": 0, "val": 1, "test": 2}
_CALIBRATION_STREAM = 3  # the training tasks population statistics are estimated from


class EpisodicDataModule(L.LightningDataModule):
    """Serves N-way K-shot episodes from three class-disjoint splits.

    A data source subclasses it and implements :meth:`build_splits`, returning one
    :class:`ClassDataset` per split (and optionally :meth:`prepare_data` for one-off work such as
    rendering a cache). Everything else — samplers, DDP sharding, fixed evaluation episodes, checks —
    lives here once.

    Every batch is an :class:`Episode` of ``meta_batch_size`` tasks (divided over DDP processes).
    Training draws ``steps_per_epoch`` fresh meta-batches per epoch; validation and test use fixed,
    seeded lists of ``val_episodes`` and ``test_episodes`` tasks, the same at every evaluation.

    Absent splits: a source may return no ``val`` or ``test`` split (e.g. ``split_fractions=(1, 0,
    0)``: meta-train on every class). Without ``val``, :meth:`val_dataloader` returns ``[]`` and
    Lightning skips validation in ``fit`` (an info line says so at setup), and ``validate`` stops at
    setup with an error; without ``test``, so do ``test`` and ``predict``. An absent split needs no classes, so ``test_ways``
    is checked only against the splits that exist.

    At :meth:`setup`, once, before any training: every image file of the splits is checked (its
    header, so a text file named ``.png`` or an empty file is named then, not at some training step;
    see :func:`~lightning_metakd.data.dataset.check_image_files`), the splits are proved disjoint,
    their sizes are printed on rank zero, and each split's sampler is built, so a task shape the
    data cannot serve fails there.

    Resuming: a run resumed from any checkpoint, mid-epoch included, trains on the episodes the
    uninterrupted run would have, in the same order, with the same random states: the training
    :class:`~lightning_metakd.data.loader.EpisodeLoader` is saved and restored by Lightning, and
    :meth:`state_dict` holds the process's random states, put back before the first batch trained
    after the resume. Loaders draw their worker seeds from their own generator, never from the
    global one, so evaluating never shifts the random numbers that training uses.

    A data source's constructor takes its own arguments and forwards the rest with ``**kwargs``
    (``super().__init__(**kwargs)``): LightningCLI (jsonargparse) follows the forwarding, so
    ``metakd fit --data.help <Source>`` lists every argument below with its type, default and help.

    Args:
        ways: classes per training task (the N of N-way).
        shots: support images per class in a training task (the K of K-shot).
        queries: query images per class in a training task.
        meta_batch_size: tasks per optimisation step, over all processes of all nodes (rounded up
            to a multiple of the number of processes, with a warning; see :meth:`tasks_per_process`).
        test_ways: classes per validation/test task; default: ``ways``.
        test_shots: support images per class in validation/test tasks; default: ``shots``.
        test_queries: query images per class in validation/test tasks; default: ``queries``.
        steps_per_epoch: training meta-batches per epoch.
        val_episodes: fixed validation tasks, the same list at every validation (at least one per
            process).
        test_episodes: fixed test tasks (at least one per process).
        grouping: ``"none"`` draws a task's classes from the whole split; the source's group name
            (``"radical"`` for KanjiVG, ``"alphabet"`` for Omniglot, ``"group"`` always) draws them
            from one group — fine-grained tasks.
        rotations: add the 90° rotations of each training class as new classes (Omniglot practice).
        num_workers: DataLoader worker processes.
        seed: seeds the class split (where the source makes one) and every episode list.
        train_seed: seeds the training episodes (and the training loader's worker seeds) alone;
            default: ``seed``. Runs that differ only in ``train_seed`` (and ``seed_everything``)
            train on other episodes but share the class split and the fixed validation and test
            episodes, which ``seed`` picks: what comparing runs across training seeds needs
            (:func:`lightning_metakd.seeds.run_seeds`).
        image_size: images are resized to ``image_size x image_size``.
        train_transform: optional callable on each ``[C, H, W]`` float training image, after
            resizing.
        eval_transform: optional callable on each validation/test image, after resizing.
        train_views: with a ``train_transform``, keep a fixed set of ``train_views`` views of every
            training image and show one of them at each draw, instead of a new view every time
            (``ClassDataset(views=...)``). The teacher's outputs on each view are then computed
            once and cached, as Fast Knowledge Distillation stores its views' soft labels (Shen &
            Xing 2022): function matching at little more than the cost of distillation without
            views. ``None`` (default): a new view at every draw, the teacher runs on every task.

    Example::

        dm = KanjiDataModule(ways=5, shots=1, grouping="radical")
        dm.setup("fit"); episode = next(iter(dm.train_dataloader()))
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
        train_seed: int | None = None,
        image_size: int = 28,
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
        train_views: int | None = None,
    ) -> None:
        super().__init__()
        if train_views is not None and train_views < 1:
            raise ValueError(
                f"train_views must be at least 1 (or null for a new view per draw), got {train_views}."
            )
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
        self.train_seed = seed if train_seed is None else train_seed
        self.image_size = image_size
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.train_views = train_views
        self.splits: dict[str, ClassDataset] = {}
        self._resumed_random_states: Mapping[str, Any] | None = None
        self._warned_meta_batch = False
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])

    @abstractmethod
    def build_splits(self) -> dict[str, ClassDataset | None]:
        """Return ``{"train": ..., "val": ..., "test": ...}``, each a :class:`ClassDataset`.

        Called from :meth:`setup`. ``train`` is required; ``val`` and ``test`` may be left out (or
        ``None``) when the source has no classes for them. Implementations should honour
        ``self.image_size`` and ``self.seed``; the base class applies ``rotations`` and the
        transforms.
        """

    def describe_source(self) -> str:
        """A few words on how this source found and split its data, for the split summary.

        Sources override it (Omniglot: the split rule used; mini-ImageNet: the layout read).
        """
        return ""

    @property
    def channels(self) -> int:
        """Image channels of this source (after :meth:`setup`)."""
        self._require_setup()
        return self.splits["train"].channels

    def has_split(self, split: Split) -> bool:
        """Whether the source has classes for ``split`` (after :meth:`setup`)."""
        self._require_setup()
        return split in self.splits

    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup before it restores a checkpoint: random states of an older restore
        # (e.g. a `test` with ckpt_path) must not leak into this run.
        self._resumed_random_states = None
        if not self.splits:
            try:
                self._set_up_splits()
            except BaseException:
                self.splits = {}
                raise
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn (a str enum)
        needed = {"validate": "val", "test": "test", "predict": "test"}.get(stage or "")
        if needed and needed not in self.splits:
            raise ValueError(self._absent_message(needed, stage))

    def _set_up_splits(self) -> None:
        """Build, check and summarise the splits (the first :meth:`setup` of this DataModule)."""
        splits = checked_splits(type(self).__name__, self.build_splits())
        if self.rotations:
            splits["train"] = splits["train"].with_rotations(4)
        splits["train"].transform = self.train_transform or splits["train"].transform
        if self.train_views is not None and splits["train"].transform is None:
            raise ValueError(
                "train_views keeps a fixed set of augmented views per training image, but there is "
                "no train_transform to make them; set data.init_args.train_transform or remove "
                "train_views."
            )
        splits["train"].views = self.train_views
        for s in ("val", "test"):
            if s in splits:
                splits[s].transform = self.eval_transform or splits[s].transform
        self.splits = splits
        rank_zero_info(self.describe_splits())
        if "val" not in splits:
            rank_zero_info(self._absent_message("val"))
        # Build every sampler once so that bad ways/shots fail here, before any training starts.
        for split in splits:
            self.sampler(split)

    def describe_splits(self) -> str:
        """The split sizes, as printed at setup: classes, images and groups of each split.

        For each evaluation split, the groups (alphabets, radicals) it holds out from training.

        Example (the full Omniglot, ``rotations=True``)::

            OmniglotDataModule (split 'vinyals'): 1,623 classes, 32,460 images
              train  1,100 classes   22,000 images   36 alphabets  (x4 rotations: 4,400 classes)
              val      100 classes    2,000 images    3 alphabets, 2 held out: Glagolitic, Gurmukhi
              test     423 classes    8,460 images   13 alphabets, 13 held out: Gurmukhi, ...
        """
        self._require_setup()
        return split_summary(
            type(self).__name__,
            self.splits,
            self.describe_source(),
            self.group_name,
            self.extra_groups(),
        )

    def extra_groups(self) -> tuple[str, Callable[[str], bool]] | None:
        """Groups of another kind than :attr:`group_name` that the splits may hold, for the
        summary to count apart: ``(what they are, which groups)``; ``None`` (the default): none."""
        return None

    def _absent_message(self, split: Split, stage: str | None = None) -> str:
        """Why ``split`` is missing and what to change; ``stage=None``: the info line of a fit."""
        why = (
            f"{type(self).__name__} has no {split} split (a zero {split} fraction in "
            "split_fractions, e.g. (1, 0, 0), gives it no classes)"
        )
        if stage is None:
            return (
                f"Validation is off: {why}. Lightning skips validation, so no val/acc is logged; "
                "with metakd fit, add --trainer.limit_val_batches 0 --checkpoint.monitor null to "
                "skip it without warnings (best.ckpt is then the latest)."
            )
        example = "(0.8, 0.2, 0)" if split == "val" else "(0.8, 0, 0.2)"
        return (
            f"{why}, so there is nothing to {stage}. Give split_fractions a {split} fraction, "
            f"e.g. {example}, to hold out {split} classes."
        )

    def _require_setup(self) -> None:
        if not self.splits:
            raise RuntimeError(f"Call {type(self).__name__}.setup() before asking for data.")

    def _require_split(self, split: Split) -> None:
        self._require_setup()
        if split not in self.splits:
            raise ValueError(self._absent_message(split, "validate" if split == "val" else "test"))

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
        self._require_split(split)
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
            seed=self.train_seed if train else self.seed,
            stream=_STREAMS[split],
            grouping=self.grouping != "none",
            num_replicas=world,
            rank=rank,
            split=split,
        )

    def calibration_images(self, tasks: int = 32) -> list[torch.Tensor]:
        """Support and query sets of ``tasks`` fixed training tasks, one ``[B, C, H, W]`` each.

        What a learner estimates population BatchNorm statistics from
        (:meth:`~lightning_metakd.algorithms.Learner.calibrate`): drawn from their own seeded
        stream, the same on every process and at every call, and never shifting the training
        episodes or the random states.
        """
        self._require_split("train")
        sampler = EpisodeSampler(
            self.splits["train"], ways=self.ways, shots=self.shots, queries=self.queries,
            num_tasks=tasks, fixed=True, seed=self.seed, stream=_CALIBRATION_STREAM,
            grouping=self.grouping != "none", split="train",
        )  # fmt: skip
        images = []
        for spec in sampler:
            support_x, _, query_x, *_ = self.splits["train"][spec]
            images += [support_x, query_x]
        return images

    def dataloader(self, split: Split) -> DataLoader:
        """A DataLoader of :class:`Episode` s for ``split`` (what the ``*_dataloader`` hooks return).

        An :class:`~lightning_metakd.data.loader.EpisodeLoader`: Lightning resumes it mid-epoch.
        """
        sampler = self.sampler(split)
        base = self.train_seed if split == "train" else self.seed
        seed = int(np.random.SeedSequence([base, _STREAMS[split]]).generate_state(1)[0])
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

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The fixed validation episodes, or ``[]`` (Lightning skips validation) without a val split."""
        self._require_setup()
        return self.dataloader("val") if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        """The fixed test episodes: ``metakd predict`` labels their query sets."""
        self._require_setup()
        if "test" not in self.splits:
            raise ValueError(self._absent_message("test", "predict"))
        return self.dataloader("test")

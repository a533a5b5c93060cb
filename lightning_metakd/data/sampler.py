"""Draws N-way K-shot tasks from a :class:`ClassDataset`, sharded across DDP ranks."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import DistributedSampler

from lightning_metakd.data.dataset import ClassDataset
from lightning_metakd.data.episode import TaskSpec


class EpisodeSampler(DistributedSampler):
    """Yields :class:`TaskSpec` s; a ``DataLoader`` with ``batch_size=meta_batch_size`` makes episodes.

    Two modes:

    - ``fixed=False`` (training): ``num_tasks`` fresh random tasks per epoch, drawn from
      ``(seed, epoch)``; call :meth:`set_epoch` (Lightning does) to get new tasks each epoch.
    - ``fixed=True`` (validation, test): one seeded list of ``num_tasks`` tasks, identical at every
      evaluation, in every run with the same data and seed.

    Sharding: all ranks draw the same global list and rank ``r`` keeps tasks ``r, r + W, r + 2W, ...``
    — no task is duplicated or dropped, and batch ``b`` of every rank together is exactly global batch
    ``b`` when the per-rank batch size is ``meta_batch_size / W``. For training ``num_tasks`` must be
    divisible by ``W``; evaluation shards may differ in length by one.

    Resuming mid-epoch: :meth:`skip_next` makes the next iteration start after the tasks a killed
    run had already trained on, without drawing their images; ``len`` stays the whole epoch
    (:class:`~lightning_metakd.data.loader.EpisodeLoader` calls it when Lightning restores a
    mid-epoch checkpoint).

    It subclasses :class:`~torch.utils.data.DistributedSampler` only so that Lightning recognises it
    as already sharded and does not wrap it again.

    Args:
        dataset: the split to draw from.
        ways, shots, queries: the task shape.
        num_tasks: tasks per epoch (training) or in the fixed list (evaluation), over all ranks.
        fixed: evaluation mode (see above).
        seed: base seed; ``stream`` separates independent lists drawn with the same seed.
        grouping: ``False`` draws a task's classes from the whole split; ``True`` first picks one of
            ``dataset.groups`` with at least ``ways`` classes, then the classes inside it.
        num_replicas, rank: the DDP world; defaults to one process.
        split: the split's name (``"train"``, ``"val"``, ``"test"``), for error messages: they
            then name the split and the DataModule setting to change (``test_ways`` for val/test).

    Example::

        sampler = EpisodeSampler(dataset, ways=5, shots=1, queries=15, num_tasks=600, fixed=True)
        loader = DataLoader(dataset, sampler=sampler, batch_size=32, collate_fn=Episode.from_tasks)
    """

    def __init__(
        self,
        dataset: ClassDataset,
        ways: int,
        shots: int,
        queries: int,
        num_tasks: int,
        fixed: bool = False,
        seed: int = 0,
        stream: int = 0,
        grouping: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        split: str | None = None,
    ) -> None:
        # DistributedSampler.__init__ is not called: it would query torch.distributed eagerly.
        for name, value in (("ways", ways), ("shots", shots), ("num_tasks", num_tasks)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if queries < 0:
            raise ValueError(f"queries must be non-negative, got {queries}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside a world of {num_replicas} processes.")
        if not fixed and num_tasks % num_replicas:
            raise ValueError(
                f"{num_tasks} training tasks cannot be split evenly over {num_replicas} processes "
                f"(num_nodes × devices); make meta_batch_size a multiple of {num_replicas}."
            )
        self.dataset = dataset
        self.ways, self.shots, self.queries = ways, shots, queries
        self.num_tasks = num_tasks
        self.fixed = fixed
        self.shuffle = not fixed
        self.drop_last = False
        self.seed, self.stream = seed, stream
        self.grouping = grouping
        self.num_replicas, self.rank = num_replicas, rank
        self.split = split
        self.epoch = 0
        self.pools = self._pools()
        self._fixed_tasks: list[TaskSpec] | None = None
        self._skip = 0

    def _pools(self) -> list[np.ndarray]:
        """Class pools a task may be drawn from, checked so that every task can be drawn."""
        ds, need = self.dataset, self.shots + self.queries
        where = f"the {self.split} split" if self.split else "this split"
        short = [c for c in range(ds.num_classes) if len(ds.indices_by_class[c]) < need]
        if short:
            c = short[0]
            of = f" of {where}" if self.split else ""
            raise ValueError(
                f"Class '{ds.class_names[c]}'{of} has {len(ds.indices_by_class[c])} images, but a "
                f"task needs shots + queries = {self.shots} + {self.queries} = {need} per class "
                f"({len(short)} class(es) are short). Lower {self._setting('shots')} or "
                f"{self._setting('queries')}, or remove small classes."
            )
        ways = self._setting("ways")
        if not self.grouping:
            if ds.num_classes < self.ways:
                raise ValueError(
                    f"A task needs {self.ways} ways but {where} has only {ds.num_classes} "
                    f"classes. Lower {ways} to at most {ds.num_classes}, or give {where} more "
                    "classes."
                )
            return [np.arange(ds.num_classes)]
        if not ds.groups:
            raise ValueError(
                f"grouping was asked for, but {where} defines no class groups; use grouping='none'."
            )
        pools = [np.asarray(m) for m in ds.groups.values() if len(m) >= self.ways]
        if not pools:
            largest = max(len(m) for m in ds.groups.values())
            raise ValueError(
                f"No group in {where} has {self.ways} classes (the largest has {largest}); lower "
                f"{ways} to at most {largest}, or use grouping='none'."
            )
        return pools

    def _setting(self, name: str) -> str:
        """The DataModule setting behind ``ways``/``shots``/``queries`` of this split's tasks."""
        if self.split in ("val", "test"):
            return f"test_{name}"
        return name if self.split else f"{name} (or test_{name})"

    def draw(self, rng: np.random.Generator) -> TaskSpec:
        """One random task from ``rng``."""
        pool = self.pools[rng.integers(len(self.pools))] if len(self.pools) > 1 else self.pools[0]
        classes = rng.choice(pool, self.ways, replace=False)
        support, query = [], []
        for c in classes:
            members = self.dataset.indices_by_class[c]
            picked = members[rng.choice(len(members), self.shots + self.queries, replace=False)]
            support.extend(picked[: self.shots].tolist())
            query.extend(picked[self.shots :].tolist())
        return TaskSpec(tuple(int(c) for c in classes), tuple(support), tuple(query))

    def global_tasks(self) -> list[TaskSpec]:
        """The whole list of this epoch (training) or of the evaluation, before sharding."""
        if self.fixed:
            if self._fixed_tasks is None:
                rng = np.random.default_rng([self.seed, self.stream, 1])
                self._fixed_tasks = [self.draw(rng) for _ in range(self.num_tasks)]
            return self._fixed_tasks
        rng = np.random.default_rng([self.seed, self.stream, 0, self.epoch])
        return [self.draw(rng) for _ in range(self.num_tasks)]

    def __iter__(self) -> Iterator[TaskSpec]:
        skip, self._skip = self._skip, 0
        return iter(self.global_tasks()[self.rank :: self.num_replicas][skip:])

    def skip_next(self, tasks: int) -> None:
        """Start the next iteration at task ``tasks`` of this process's list (then every one again).

        The list is still drawn from ``(seed, epoch)`` as a whole, so the tasks that follow are the
        ones an uninterrupted iteration would yield after its first ``tasks``.
        """
        if tasks < 0:
            raise ValueError(f"tasks to skip must be non-negative, got {tasks}.")
        self._skip = tasks

    def __len__(self) -> int:
        return len(range(self.rank, self.num_tasks, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

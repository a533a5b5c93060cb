"""The unit of episodic data: a meta-batch of N-way K-shot tasks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor


class TaskSpec(NamedTuple):
    """Which samples make up one task: what an episode sampler yields and a dataset loads.

    ``classes[j]`` is the class that gets task label ``j``. ``support`` holds ``ways * shots`` sample
    indices and ``query`` holds ``ways * queries``, both class-major (``shots`` samples of label 0,
    then of label 1, ...). Indices refer to the split's :class:`~lightning_metakd.data.ClassDataset`.
    """

    classes: tuple[int, ...]
    support: tuple[int, ...]
    query: tuple[int, ...]

    @property
    def ways(self) -> int:
        return len(self.classes)

    @property
    def shots(self) -> int:
        return len(self.support) // len(self.classes)

    @property
    def queries(self) -> int:
        return len(self.query) // len(self.classes)


@dataclass
class Episode:
    """A meta-batch of ``T`` tasks, each an N-way K-shot problem with Q queries per class.

    Shapes (``T`` = meta-batch size, ``N`` = ways, ``K`` = shots, ``Q`` = queries):

    - ``support_x``: ``[T, N*K, C, H, W]`` float, ``support_y``: ``[T, N*K]`` long in ``0..N-1``
    - ``query_x``: ``[T, N*Q, C, H, W]`` float, ``query_y``: ``[T, N*Q]`` long in ``0..N-1``
    - ``classes``: ``[T, N]`` long, the split's class index behind each task label

    Labels are remapped per task: label ``j`` of task ``t`` is class ``classes[t, j]``. Lightning moves an
    ``Episode`` to the device like any dataclass of tensors; :meth:`to` does the same by hand.

    Example::

        ep = Episode.from_tasks([dummy_task(ways=5, shots=1, queries=15)] * 4)
        ep.support_x.shape
        # torch.Size([4, 5, 1, 28, 28])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor

    def __post_init__(self) -> None:
        if self.support_x.dim() != 5 or self.query_x.dim() != 5:
            raise ValueError(
                "Episode expects support_x and query_x of shape [tasks, samples, C, H, W]; got "
                f"{tuple(self.support_x.shape)} and {tuple(self.query_x.shape)}."
            )

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def ways(self) -> int:
        return self.classes.shape[1]

    @property
    def shots(self) -> int:
        return self.support_x.shape[1] // self.ways

    @property
    def queries(self) -> int:
        return self.query_x.shape[1] // self.ways

    def __len__(self) -> int:
        return self.num_tasks

    def task(self, index: int) -> Episode:
        """Task ``index`` alone, as an ``Episode`` with ``T = 1``."""
        return Episode(**{f.name: getattr(self, f.name)[index : index + 1] for f in fields(self)})

    def split(self, size: int) -> list[Episode]:
        """Chunks of at most ``size`` tasks (for memory-bounded processing)."""
        chunks = [getattr(self, f.name).split(size) for f in fields(self)]
        return [Episode(*parts) for parts in zip(*chunks, strict=True)]

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> Episode:
        """Move every tensor to ``device``; ``dtype`` casts the images only (labels stay long)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            cast = dtype if value.is_floating_point() else None
            out[f.name] = value.to(device=device, dtype=cast, non_blocking=non_blocking)
        return Episode(**out)

    def clone(self) -> Episode:
        """A copy of every tensor (e.g. so that autograd may use tensors made in inference mode)."""
        return Episode(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def pin_memory(self) -> Episode:
        return Episode(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    @staticmethod
    def from_tasks(tasks: Sequence[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]) -> Episode:
        """Stack tasks ``(support_x, support_y, query_x, query_y, classes)``: the DataLoader's collate."""
        if not tasks:
            raise ValueError("Episode.from_tasks needs at least one task.")
        return Episode(*(torch.stack(parts) for parts in zip(*tasks, strict=True)))

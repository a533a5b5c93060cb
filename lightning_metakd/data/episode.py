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
    - ``support_index``, ``query_index``: ``[T, N*K]`` and ``[T, N*Q]`` long, the split's sample
      index of each image, or ``None`` (sources that do not know them): what lets a frozen
      teacher's per-image outputs be cached across epochs.

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
    support_index: Tensor | None = None
    query_index: Tensor | None = None

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

    def _map(self, fn) -> Episode:  # noqa: ANN001 - a function of one tensor
        return Episode(
            **{
                f.name: None if (v := getattr(self, f.name)) is None else fn(v)
                for f in fields(self)
            }
        )

    def task(self, index: int) -> Episode:
        """Task ``index`` alone, as an ``Episode`` with ``T = 1``."""
        return self._map(lambda t: t[index : index + 1])

    def split(self, size: int) -> list[Episode]:
        """Chunks of at most ``size`` tasks (for memory-bounded processing)."""
        starts = range(0, self.num_tasks, size)
        return [self._map(lambda t, a=a: t[a : a + size]) for a in starts]

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> Episode:
        """Move every tensor to ``device``; ``dtype`` casts the images only (labels stay long)."""
        return self._map(
            lambda t: t.to(
                device=device, dtype=dtype if t.is_floating_point() else None,
                non_blocking=non_blocking,
            )
        )  # fmt: skip

    def clone(self) -> Episode:
        """A copy of every tensor (e.g. so that autograd may use tensors made in inference mode)."""
        return self._map(lambda t: t.clone())

    def pin_memory(self) -> Episode:
        return self._map(lambda t: t.pin_memory())

    @staticmethod
    def from_tasks(tasks: Sequence[tuple[Tensor, ...]]) -> Episode:
        """Stack tasks ``(support_x, support_y, query_x, query_y, classes[, support_index,
        query_index])``: the DataLoader's collate."""
        if not tasks:
            raise ValueError("Episode.from_tasks needs at least one task.")
        return Episode(*(torch.stack(parts) for parts in zip(*tasks, strict=True)))

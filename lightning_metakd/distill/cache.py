"""Per-image outputs of a frozen teacher, computed once and reused across epochs.

A frozen metric teacher (ProtoNet, MatchingNet) scores a task from per-image embeddings: the
prototypes are means of support embeddings, the logits distances of query embeddings to them. When
its BatchNorm statistics are fixed (the ``"population"`` policy: meta-training statistics, the same
for every batch), an image's embedding no longer depends on the other images of its task, so it
can be computed the first time the image is drawn and looked up afterwards — the teacher then
costs almost nothing after the first epoch, and what the student learns is unchanged (the same
embeddings, the same prototypes, the same targets). With batch statistics (transductive, support)
an embedding depends on its batch and nothing can be cached; nor with augmentation that draws a
new view of an image every time. With a fixed set of views per image (the data module's
``train_views``) the episodes carry view indices, and the table holds one row per view.

:class:`TeacherCache` holds the table; :class:`TableLookup` is a "model" whose forward looks its
input indices up, so the teacher's own algorithm (``adapt``/``logits``) runs on it unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_metakd.algorithms import Learner, batch_norm_statistics


class TableLookup(nn.Module):
    """``forward(indices) = table[indices]``: cached embeddings where a model's outputs would be."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, indices: Tensor) -> Tensor:
        return self.table[indices]


class TeacherCache:
    """The per-image embeddings of one frozen metric teacher with population statistics.

    Example::

        cache = TeacherCache.for_teacher(teacher)        # None when the teacher cannot be cached
        cache.fill(teacher, images, indices)             # embeds the images not seen yet
        state = teacher.algorithm.adapt(cache.lookup(), {}, support_index, support_y, ways, False)
    """

    def __init__(self) -> None:
        self.table: Tensor | None = None
        self.filled: Tensor | None = None
        self.computed = 0  #: images embedded so far (the teacher's forward passes that were paid)

    @staticmethod
    def for_teacher(teacher: Learner) -> TeacherCache | None:
        """A cache if ``teacher``'s outputs are per-image (a metric algorithm, population
        statistics), else ``None``."""
        if teacher.algorithm.needs_head or teacher.normalization != "population":
            return None
        return TeacherCache()

    @torch.no_grad()
    def fill(self, teacher: Learner, images: Tensor, indices: Tensor, bf16: bool = False) -> None:
        """Embed the images of ``images [M, C, H, W]`` (sample ``indices [M]``) not cached yet."""
        indices = indices.flatten()
        images = images.flatten(0, -4)
        size = int(indices.max()) + 1
        if self.table is None or size > len(self.table):
            self._grow(size, teacher, images)
        missing = ~self.filled[indices]
        if not bool(missing.any()):
            return
        first = torch.zeros_like(missing)  # one image per missing index (an index may repeat)
        unique, inverse = torch.unique(indices, return_inverse=True)
        order = torch.full((len(unique),), len(indices), dtype=torch.long, device=indices.device)
        order = order.scatter_reduce(
            0, inverse, torch.arange(len(indices), device=indices.device), "amin"
        )
        first[order] = True
        pick = missing & first
        statistics = teacher.population_statistics()
        autocast = torch.autocast(images.device.type, torch.bfloat16, bf16)
        with autocast, batch_norm_statistics(teacher.model, statistics):
            embedded = teacher.model(images[pick]).flatten(1).float()
        self.table[indices[pick]] = embedded
        self.filled[indices[pick]] = True
        self.computed += int(pick.sum())

    def _grow(self, size: int, teacher: Learner, images: Tensor) -> None:
        width = getattr(teacher.backbone, "num_features", None)
        if width is None:
            raise ValueError("TeacherCache needs a backbone with num_features.")
        table = torch.zeros(size, width, device=images.device)
        filled = torch.zeros(size, dtype=torch.bool, device=images.device)
        if self.table is not None:
            table[: len(self.table)] = self.table
            filled[: len(self.filled)] = self.filled
        self.table, self.filled = table, filled

    def lookup(self) -> TableLookup:
        """The model to run the teacher's algorithm on: sample indices in, embeddings out."""
        if self.table is None:
            raise RuntimeError("the teacher cache is empty; fill it first.")
        return TableLookup(self.table)


__all__ = ["TableLookup", "TeacherCache"]

"""TensorBoard helpers of the callbacks: the writer of a run, images as tiles, an episode as a grid."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor


def tensorboard_experiment(trainer: L.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger on global rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def to_rgb(images: Tensor) -> Tensor:
    """``[B, C, H, W]`` → ``[B, 3, H, W]`` in ``[0, 1]``, each image min-max scaled on its own."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != 3:
        images = images[:, :1].expand(-1, 3, -1, -1)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(1e-8)


def episode_grid(
    support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, max_queries: int = 5
) -> Tensor:
    """One task as an image ``[3, H', W']``: per class, its support images, a blank, its queries.

    Args:
        support_x, support_y: ``[N*K, C, H, W]`` and ``[N*K]`` of one task.
        query_x, query_y: ``[N*Q, C, H, W]`` and ``[N*Q]``; at most ``max_queries`` per class shown.

    Example:
        >>> grid = episode_grid(torch.rand(5, 1, 28, 28), torch.arange(5),
        ...                     torch.rand(10, 1, 28, 28), torch.arange(5).repeat_interleave(2))
        >>> grid.shape  # 5 rows of 1 support + 1 blank + 2 queries, 2 px padding
        torch.Size([3, 152, 122])
    """
    from torchvision.utils import make_grid

    ways = int(support_y.max()) + 1
    support, query = to_rgb(support_x), to_rgb(query_x)
    shots = max(int((support_y == c).sum()) for c in range(ways))
    queries = min(max_queries, max(int((query_y == c).sum()) for c in range(ways)))
    blank = torch.zeros_like(support[0])
    tiles = []
    for c in range(ways):
        row_s = list(support[support_y == c])
        row_q = list(query[query_y == c][:queries])
        tiles += row_s + [blank] * (shots - len(row_s)) + [blank]
        tiles += row_q + [blank] * (queries - len(row_q))
    return make_grid(torch.stack(tiles), nrow=shots + 1 + queries, padding=2, pad_value=0.5)


__all__ = ["episode_grid", "tensorboard_experiment", "to_rgb"]

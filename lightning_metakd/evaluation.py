"""Episodic accuracy with a 95% confidence interval, correct under DDP."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval, ``1.96 · σ / √n``.

    ``σ`` is the sample standard deviation (``n − 1`` in the denominator) over the ``n`` values —
    the per-episode accuracies of the few-shot literature (Snell et al. 2017 and others report
    "mean ± 95% CI over 600 test episodes" this way).

    Example:
        >>> mean_ci95(torch.tensor([1.0, 0.0, 1.0, 1.0]))
        (0.75, 0.49)
    """
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value.")
    mean = values.mean().item()
    if n == 1:
        return mean, 0.0
    return mean, 1.96 * values.std(unbiased=True).item() / math.sqrt(n)


class EpisodicAccuracy(Metric):
    """Accumulates per-episode accuracies; :meth:`compute` returns ``(mean, ci95)``.

    Holds sums (count, Σa, Σa²) rather than lists, so states of DDP ranks with different episode
    counts add up exactly and the result equals one process over all episodes.

    Example:
        >>> metric = EpisodicAccuracy()
        >>> metric.update(torch.tensor([1.0, 0.0, 1.0, 1.0]))
        >>> [round(v, 2) for v in metric.compute().tolist()]
        [0.75, 0.49]
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "squares", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, accuracies: Tensor) -> None:
        """Add the accuracies of a batch of episodes (shape ``[T]``)."""
        a = accuracies.detach().double().flatten()
        self.count += a.numel()
        self.total += a.sum()
        self.squares += (a * a).sum()

    def compute(self) -> Tensor:
        """``tensor([mean, ci95])`` in float64."""
        n = self.count
        mean = self.total / n.clamp(min=1)
        variance = ((self.squares - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0)
        ci95 = torch.where(
            n > 1, 1.96 * variance.sqrt() / n.clamp(min=1).sqrt(), torch.zeros_like(n)
        )
        return torch.stack([mean, ci95])

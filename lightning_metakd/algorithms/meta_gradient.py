"""Meta-gradients with one task graph alive at a time."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def memory_bounded_loss(chunk_losses: Iterable[Tensor], parameters: Sequence[Tensor]) -> Tensor:
    """A scalar whose value is ``Σ_c L_c`` and whose ``backward`` gives ``Σ_c ∇L_c``, computed chunk by chunk.

    Second-order MAML keeps the graph of every inner loop until ``backward``: a meta-batch of 32
    tasks holds 32 graphs at once. Here each chunk's loss is differentiated as soon as it is made
    (``torch.autograd.grad``, which frees that chunk's graph), the gradients are summed, and the
    returned surrogate ``Σ_p <p, g_p> − sg(Σ_p <p, g_p>) + sg(Σ_c L_c)`` (``sg`` = stop-gradient)
    hands exactly those gradients to the one ``backward`` that Lightning runs — so automatic
    optimisation, gradient clipping, precision plugins and DDP's single gradient all-reduce behave
    as usual. Peak memory becomes that of one chunk (learn2learn's per-task ``backward`` pattern).

    ``chunk_losses`` is consumed lazily: pass a generator so only one chunk's graph exists at once.
    Weight each chunk's loss (e.g. by its share of the tasks) so the sum is the loss you want.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> loss = memory_bounded_loss((w[i] ** 2 for i in range(2)), [w])
        >>> loss.item(), loss.backward(), w.grad.tolist()
        (5.0, None, [2.0, 4.0])
    """
    parameters = [p for p in parameters if p.requires_grad]
    total: Tensor | None = None
    grads: list[Tensor | None] = [None] * len(parameters)
    for loss in chunk_losses:
        chunk_grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        grads = [
            g if acc is None else (acc if g is None else acc + g)
            for acc, g in zip(grads, chunk_grads, strict=True)
        ]
        total = loss.detach() if total is None else total + loss.detach()
    if total is None:
        raise ValueError("memory_bounded_loss needs at least one chunk loss.")
    inner = [(p * g).sum() for p, g in zip(parameters, grads, strict=True) if g is not None]
    if not inner:
        return total
    surrogate = torch.stack(inner).sum()
    return surrogate - surrogate.detach() + total

"""The episode engine: one function maps a per-task function over the tasks of an episode.

Meta-learning and distillation both compute something for each task of a meta-batch — adapt on
its support set, score its queries, take distillation terms — and stack the results. That mapping
is written once, here: :func:`map_tasks` runs the per-task function in a Python loop or under
:func:`torch.func.vmap` (in chunks), and :func:`use_vmap` is the one place that decides between the
two when the caller leaves it open (the loop on CPU, vmap elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_metakd.algorithms.normalization import composite_normalization


def use_vmap(vmap_tasks: bool | None, device: torch.device | str) -> bool:
    """Whether tasks on ``device`` are vmapped: ``vmap_tasks`` if given, else ``device != cpu``.

    On CPU the per-task weights of a vmapped inner loop become grouped convolutions (measured 2.7x
    slower than the loop, ``benchmarks/maml_step.py``); on GPUs vmap is several times faster.
    """
    if vmap_tasks is not None:
        return bool(vmap_tasks)
    return torch.device(device).type != "cpu"


def map_tasks(
    fn: Callable[..., Any],
    tasks: Sequence[Tensor],
    *,
    vmap_tasks: bool | None = None,
    chunk_size: int | None = None,
    algorithms: Iterable[Any] = (),
) -> Any:
    """``fn`` applied to every task, its outputs stacked along a new leading task dimension.

    Args:
        fn: the per-task function; it takes one slice of each tensor of ``tasks`` (the task
            dimension removed) and returns a tensor or a nested tuple/list/dict of tensors. Under
            vmap it must be pure: values leave it only as return values.
        tasks: tensors whose first dimension is the task, ``T`` for all of them (e.g. an
            episode's ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]``, ``query_x``).
        vmap_tasks: ``True`` maps with :func:`torch.func.vmap` (``randomness="different"``, so
            dropout differs per task), inside :class:`~lightning_metakd.algorithms.
            composite_normalization` (the fused normalisation kernels have wrong second
            derivatives under vmap); ``False`` loops; ``None`` decides with :func:`use_vmap`.
            Both give the same numbers (tested).
        chunk_size: with vmap, at most this many tasks at once (bounds memory).
        algorithms: the algorithms whose inner loops run inside ``fn``; each is asked
            ``check_vmap()`` before vmapping, so an algorithm that cannot run under vmap fails
            with its own message.

    Returns:
        ``fn``'s output structure with every tensor stacked: ``[T, ...]``.

    Example:
        >>> x = torch.arange(6.0).reshape(3, 2)
        >>> map_tasks(lambda row: {"sum": row.sum(), "twice": 2 * row}, (x,))["sum"]
        tensor([1., 5., 9.])
    """
    if not tasks:
        raise ValueError("map_tasks needs at least one tensor of tasks.")
    if use_vmap(vmap_tasks, tasks[0].device):
        for algorithm in algorithms:
            algorithm.check_vmap()
        batched = vmap(fn, randomness="different", chunk_size=chunk_size)
        with composite_normalization():
            return batched(*tasks)
    outputs = [fn(*task) for task in zip(*tasks, strict=True)]
    leaves, spec = tree_flatten(outputs[0])
    columns = [tree_flatten(out)[0] for out in outputs]
    stacked = [torch.stack([column[i] for column in columns]) for i in range(len(leaves))]
    return tree_unflatten(stacked, spec)


__all__ = ["map_tasks", "use_vmap"]

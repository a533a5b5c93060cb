"""Normalisation layers inside the inner loop: the BatchNorm policy and a vmap-safe fallback.

Two things live here:

- :func:`prepare_model`: the library's BatchNorm policy (batch statistics, transductive).
- :func:`composite_normalization`: a context in which ``F.batch_norm``, ``F.instance_norm`` and
  ``F.layer_norm`` are computed from elementary operations (mean, variance, affine). The vmap path
  of :meth:`~lightning_metakd.algorithms.MetaAlgorithm.episode_logits` runs inside it, because in
  torch 2.14 the second derivative of the fused kernels is wrong under ``torch.func.vmap``: the
  MAML meta-gradient of a vmapped inner loop through BatchNorm or LayerNorm differs from the
  per-task loop by up to ~1% (measured in float64; the logits and first-order gradients agree,
  GroupNorm is unaffected). The composite forms give the loop's numbers to 1e-15 (tested in
  ``tests/test_algorithms.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import replace_all_batch_norm_modules_
from torch.overrides import TorchFunctionMode

_warned_batch_norm = False


def prepare_model(model: nn.Module) -> nn.Module:
    """Make ``model`` follow the BatchNorm policy of this library; returns the same module.

    Policy: BatchNorm normalises with the statistics of the batch it sees, in training and in
    evaluation alike (transductive, the convention of MAML's reference implementation): a task's
    support set and its query set are each normalised with their own batch statistics. Our
    backbones are built that way (``track_running_stats=False``). A user backbone whose BatchNorm
    tracks running statistics would write buffers inside the inner loop, which
    :func:`torch.func.vmap` forbids and which would leak statistics across tasks; this function
    switches such layers to batch statistics in place with
    :func:`torch.func.replace_all_batch_norm_modules_` and warns once per process.

    Example:
        >>> from torch import nn
        >>> net = prepare_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
        >>> net[1].track_running_stats
        False
    """
    global _warned_batch_norm
    tracking = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if tracking:
        if not _warned_batch_norm:
            warnings.warn(
                f"{type(model).__name__} has BatchNorm layers with running statistics "
                f"({', '.join(tracking[:3])}{', ...' if len(tracking) > 3 else ''}); switching "
                "them to batch statistics (transductive, the MAML convention) so that adaptation "
                "works under torch.func.vmap. Build the backbone with track_running_stats=False to "
                "silence this warning.",
                UserWarning,
                stacklevel=2,
            )
            _warned_batch_norm = True
        replace_all_batch_norm_modules_(model)
    return model


def _normalize(x: Tensor, dims: list[int], eps: float) -> Tensor:
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]) -> Tensor:
    if weight is not None:
        x = x * weight.reshape(shape)
    if bias is not None:
        x = x + bias.reshape(shape)
    return x


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor | None:
    if running_mean is not None or running_var is not None:
        return None  # running statistics: leave it to the fused kernel
    dims = [0, *range(2, input.dim())]
    shape = [1, -1] + [1] * (input.dim() - 2)
    return _affine(_normalize(input, dims, eps), weight, bias, shape)


def _instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor | None:
    if not use_input_stats or running_mean is not None or running_var is not None:
        return None
    shape = [1, -1] + [1] * (input.dim() - 2)
    return _affine(_normalize(input, list(range(2, input.dim())), eps), weight, bias, shape)


def _layer_norm(
    input: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    dims = list(range(input.dim() - len(normalized_shape), input.dim()))
    shape = list(normalized_shape)
    return _affine(_normalize(input, dims, eps), weight, bias, shape)


_COMPOSITES: dict[Callable[..., Any], Callable[..., Tensor | None]] = {
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    F.layer_norm: _layer_norm,
}


class composite_normalization(TorchFunctionMode):  # noqa: N801 - used like a function
    """Compute batch, instance and layer normalisation from elementary ops inside this context.

    Same values as the fused kernels; correct second derivatives under ``torch.func.vmap`` (see the
    module docstring). Calls with running statistics go to the fused kernel unchanged.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 3)
        >>> with composite_normalization():
        ...     y = torch.nn.functional.layer_norm(x, [3])
        >>> torch.allclose(y, torch.nn.functional.layer_norm(x, [3]), atol=1e-6)
        True
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        composite = _COMPOSITES.get(func)
        if composite is not None:
            out = composite(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


__all__ = ["composite_normalization", "prepare_model"]

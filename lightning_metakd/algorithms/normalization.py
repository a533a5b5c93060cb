"""Normalisation layers inside the inner loop: the BatchNorm policies and a vmap-safe fallback.

Three things live here:

- :data:`POLICIES`, the normalisation policies a learner can follow (which statistics its
  BatchNorm layers normalise a batch with), and :class:`batch_norm_statistics`, the context that
  records or imposes those statistics layer by layer;
- :func:`prepare_model`: our backbones normalise with batch statistics (``track_running_stats=False``);
  a backbone of yours is switched to that.
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
from dataclasses import dataclass
from typing import Any, NamedTuple

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


#: The normalisation policies, which statistics BatchNorm normalises a task's images with:
#:
#: - ``"transductive"``: each batch its own — a task's support set and its query set each with
#:   their own statistics (MAML's reference implementation, and the papers' protocol). A query's
#:   prediction depends on the other queries in its batch.
#: - ``"support"``: the support set's statistics (computed when the learner adapts) normalise
#:   every query; a query's prediction depends only on the support set and itself.
#: - ``"population"``: statistics of meta-training images, estimated once (:meth:`Learner.calibrate
#:   <lightning_metakd.algorithms.Learner.calibrate>`) and used for the support and query sets
#:   alike — Ioffe & Szegedy's (2015) inference mode, which Bronskill et al. (2020, "TaskNorm",
#:   §3) compare as the inductive baseline. Training itself uses batch statistics.
POLICIES = ("transductive", "support", "population")

Statistics = dict[str, tuple[Tensor, Tensor]]


def check_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`POLICIES`, else a ``ValueError`` that lists them."""
    if policy not in POLICIES:
        raise ValueError(
            f"unknown normalization {policy!r}; use one of {list(POLICIES)} (transductive: each "
            "batch its own statistics, the papers' protocol; support: the support set's "
            "statistics for every query; population: meta-training statistics)."
        )
    return policy


@dataclass(frozen=True)
class Normalization:
    """A normalisation policy (:data:`~lightning_metakd.algorithms.normalization.POLICIES`) and,
    for ``"population"``, the statistics it imposes."""

    policy: str = "transductive"
    population: Statistics | None = None

    def __post_init__(self) -> None:
        check_policy(self.policy)
        if self.policy == "population" and self.population is None:
            raise ValueError(
                "the population policy needs statistics of meta-training images; calibrate the "
                "learner first (Learner.calibrate(images), done by the modules at validation)."
            )


TRANSDUCTIVE = Normalization()


class TaskState(NamedTuple):
    """What a learner knows about one task after adapting: the algorithm's state (θ', prototypes,
    support embedding) and the BatchNorm statistics its queries are normalised with (``None``:
    each query batch its own)."""

    state: Any
    statistics: Statistics | None


class batch_norm_statistics(TorchFunctionMode):  # noqa: N801 - used like a function
    """Record, or impose, the statistics of every BatchNorm layer of ``model`` inside this context.

    Without ``statistics`` it records: each BatchNorm normalises with its batch statistics (as
    usual) and :attr:`recorded` keeps ``{layer path: (mean, biased variance)}`` of its input (the
    last pass, when a layer runs several times). With ``statistics`` it imposes them: each layer
    normalises with the given ``(mean, var)`` of its path instead of its batch's, so every image is
    normalised on its own. Both compute from elementary operations (correct second derivatives
    under ``torch.func.vmap``) and work inside a vmapped per-task function, where the recorded
    tensors are that task's; use them inside the same function. Layers are named through forward
    pre-hooks (``model.named_modules()``), so this works with ``functional_call``. BatchNorm layers
    with running statistics are left to PyTorch.

    Example:
        >>> import torch
        >>> from lightning_metakd.models import Conv4
        >>> net, support, query = Conv4(hidden=4), torch.rand(5, 1, 28, 28), torch.rand(3, 1, 28, 28)
        >>> with batch_norm_statistics(net) as record:
        ...     _ = net(support)
        >>> with batch_norm_statistics(net, record.recorded):
        ...     alone, together = net(query[:1]), net(query)
        >>> torch.allclose(alone, together[:1], atol=1e-6)
        True
    """

    def __init__(self, model: nn.Module, statistics: Statistics | None = None) -> None:
        super().__init__()
        self.model, self.statistics = model, statistics
        self.recorded: Statistics = {}
        self._current: str | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> batch_norm_statistics:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_pre_hook(self._naming(name)))
        if self.statistics is not None:
            missing = [n for n, _ in self._batch_norms() if n not in self.statistics]
            if missing:
                self._remove()
                raise ValueError(
                    f"no statistics for the BatchNorm layers {missing[:3]}; the statistics must "
                    "come from this network (a support pass or Learner.calibrate)."
                )
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._remove()
        super().__exit__(*exc)

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _batch_norms(self) -> list[tuple[str, nn.Module]]:
        return [
            (n, m)
            for n, m in self.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]

    def _naming(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: Any) -> None:
            self._current = name

        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.batch_norm and self._current is not None:
            out = self._batch_norm(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _batch_norm(
        self,
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
            return None
        name, self._current = self._current, None
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        if self.statistics is None:
            mean = input.mean(dims)
            var = (input - mean.reshape(shape)).pow(2).mean(dims)
            self.recorded[name] = (mean, var)
        else:
            mean, var = self.statistics[name]
        normalized = (input - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
        return _affine(normalized, weight, bias, shape)


def freeze_batch_norm(network: nn.Module, statistics: Statistics) -> nn.Module:
    """Make every BatchNorm of ``network`` normalise with ``statistics`` from now on, in place.

    Each layer gets the ``(mean, var)`` of its path as running statistics and stays in eval mode:
    the network then classifies every image on its own (and exports as a plain graph).
    """
    for name, bn in network.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            mean, var = statistics[name]
            bn.register_buffer("running_mean", mean.detach().clone())
            bn.register_buffer("running_var", var.detach().clone())
            bn.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
            bn.track_running_stats = True
            bn.eval()
    return network


__all__ = [
    "POLICIES",
    "TRANSDUCTIVE",
    "Normalization",
    "TaskState",
    "Statistics",
    "batch_norm_statistics",
    "check_policy",
    "composite_normalization",
    "freeze_batch_norm",
    "prepare_model",
]

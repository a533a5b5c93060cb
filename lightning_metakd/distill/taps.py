"""Taps: intermediate outputs captured by module path with forward hooks, not by editing ``forward``.

A feature or attention loss needs what a network computes *inside* its forward pass. Instead of
rewriting each backbone's ``forward`` to return extra values, :func:`tap` hooks the named
submodules (``model.get_submodule(path)``, the names of ``model.named_modules()``) for the duration
of a block and collects what they produced, in the spirit of torchdistill's forward hooks. It is
the library's one tap mechanism: distillation terms use it during training, projectors are sized
with it (:func:`tapped_call`), and deployment reads BatchNorm inputs with it (``inputs=True``).

Which paths to tap is the network's knowledge: backbones state their tap points
(``Conv4.tap_points()``, ``ResNet12.tap_points()``, ``VisionTransformer.tap_points()``:
``"blocks"``, ``"features"`` and, for the ViT, ``"attention"``); ``Classifier`` adds its
``backbone.`` prefix; :func:`tap_points` asks a model for one kind with a clear error, and
:func:`default_layer_map` pairs a shallower student's layers with a teacher's by relative depth.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

DEFAULT_KINDS: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
)


def module_paths(
    model: nn.Module, kinds: Iterable[type[nn.Module]] | None = DEFAULT_KINDS
) -> list[str]:
    """Paths of the submodules of ``model`` that are instances of ``kinds`` (``None``: all of them).

    These are the paths :func:`tap` accepts, in definition order, without the root ``""``.

    Example:
        >>> from torch import nn
        >>> from lightning_metakd.models import Conv4
        >>> module_paths(Conv4(hidden=8), kinds=(nn.Conv2d,))
        ['features.0.0', 'features.1.0', 'features.2.0', 'features.3.0']
    """
    kinds = tuple(kinds) if kinds is not None else (nn.Module,)
    return [name for name, m in model.named_modules() if name and isinstance(m, kinds)]


def tap_points(model: nn.Module, kind: str, needed_by: str = "this term") -> list[str]:
    """The paths of ``kind`` (``"blocks"``, ``"features"``, ``"attention"``) that ``model`` states.

    Raises a ``ValueError`` that names the model, the kinds it has and ``needed_by`` when it
    states none of that kind.

    Example:
        >>> from lightning_metakd.models import Conv4
        >>> from lightning_metakd.models.classifier import Classifier
        >>> tap_points(Conv4(), "features"), tap_points(Classifier(Conv4(), ways=5), "features")
        (['features.3'], ['backbone.features.3'])
    """
    stated = getattr(model, "tap_points", None)
    points = stated() if callable(stated) else {}
    if not points.get(kind):
        have = sorted(k for k, v in points.items() if v)
        raise ValueError(
            f"{needed_by} needs the {kind!r} tap points of the network, but "
            f"{type(model).__name__} states {('only ' + str(have)) if have else 'none'}; use a "
            "backbone that has them (Conv4 and ResNet12: blocks, features; VisionTransformer: "
            "blocks, features, attention), give the module paths yourself (module_paths(model) "
            "lists them), or add a tap_points() method to your backbone."
        )
    return list(points[kind])


def default_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer matched to each student layer: ``round((i + 1) · L_t / L_s) − 1``.

    Student layer ``i`` (0-based) of ``L_s`` is paired with the teacher layer at the same relative
    depth; ``round`` rounds halves up and the index is clipped at 0 (a student deeper than its
    teacher maps several layers to teacher layer 0). The last student layer always meets the last
    teacher layer; equal depths give the identity.

    Example:
        >>> default_layer_map(2, 4), default_layer_map(4, 6), default_layer_map(3, 3)
        ([1, 3], [1, 2, 4, 5], [0, 1, 2])
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(
            f"layer counts must be positive, got student_layers={student_layers}, "
            f"teacher_layers={teacher_layers}."
        )
    # floor(x + 1/2) with x = (i + 1) · L_t / L_s, in integers.
    return [
        max(0, (2 * (i + 1) * teacher_layers + student_layers) // (2 * student_layers) - 1)
        for i in range(student_layers)
    ]


def _resolve(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        valid = module_paths(model, kinds=None)
        close = difflib.get_close_matches(path, valid, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(
            f"{type(model).__name__} has no submodule {path!r}.{hint} Valid paths include "
            f"{valid[:6]}{' ...' if len(valid) > 6 else ''}; list them with module_paths(model)."
        ) from None


def check_paths(model: nn.Module, paths: Iterable[str]) -> None:
    """Raise a clear error (with close matches) unless every path names a submodule of ``model``."""
    for path in paths:
        _resolve(model, path)


def _first_tensor(value: Any) -> Any:
    return value[0] if isinstance(value, tuple | list) else value


@contextmanager
def tap(model: nn.Module, paths: Iterable[str], inputs: bool = False) -> Iterator[dict[str, Any]]:
    """Collect what the submodules at ``paths`` produce (or receive) while the block runs.

    Registers a forward hook (``inputs=True``: a forward pre-hook, reporting the first input) on
    ``model.get_submodule(path)`` for every path and removes them in a ``finally``. The yielded
    dict fills in as the model runs: ``{path: output}`` (a module returning a tuple reports its
    first element; a module that runs several times, its last output). Paths are validated before
    anything runs (unknown paths name close matches). When the block ends, a module that did not
    run raises an error. Use the captured tensors inside the block and return what you compute
    from them, never the dict itself: then the calling function stays pure under
    :func:`torch.func.vmap` and gradients flow through the tapped tensors as through the output.

    Example:
        >>> import torch
        >>> from lightning_metakd.models import Conv4
        >>> net = Conv4(hidden=8)
        >>> with tap(net, ["features.1", "features.3"]) as taps:
        ...     _ = net(torch.randn(2, 1, 28, 28))
        >>> taps["features.1"].shape, taps["features.3"].shape
        (torch.Size([2, 8, 7, 7]), torch.Size([2, 8, 1, 1]))
    """
    paths = list(dict.fromkeys(paths))
    modules = {path: _resolve(model, path) for path in paths}
    captured: dict[str, Any] = {}

    def make_hook(path: str):
        if inputs:

            def pre_hook(module: nn.Module, args: Any) -> None:
                captured[path] = args[0]

            return pre_hook

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[path] = _first_tensor(output)

        return hook

    register = "register_forward_pre_hook" if inputs else "register_forward_hook"
    handles = [getattr(m, register)(make_hook(p)) for p, m in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
    silent = [p for p in paths if p not in captured]
    if silent:
        raise ValueError(
            f"the tapped modules {silent} did not run in {type(model).__name__}.forward; tap a "
            "module on the forward path (see module_paths(model))."
        )


def tapped_call(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    x: Tensor,
    paths: str | Iterable[str],
    **forward_kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """Run ``model`` on ``x`` with ``params`` and return its output and the tapped outputs.

    :func:`tap` around ``torch.func.functional_call(model, params, (x,), forward_kwargs)`` (or
    ``model(x, ...)`` when ``params`` is ``None``): pure, so it works per task inside
    :func:`torch.func.vmap` and under :func:`torch.func.grad`.

    Args:
        model: the network (its structure; ``params`` supplies the values).
        params: ``{name: tensor}`` as for ``functional_call`` (e.g. adapted parameters θ'), or
            ``None`` to use the module's own parameters.
        x: the input, e.g. ``[B, C, H, W]`` images.
        paths: one path or several (``module_paths(model)`` lists candidates).
        **forward_kwargs: keyword arguments of ``model.forward``.

    Returns:
        ``(output, {path: tapped output})``.

    Example:
        >>> import torch
        >>> from lightning_metakd.models import Conv4
        >>> net = Conv4(hidden=8)
        >>> out, taps = tapped_call(net, None, torch.randn(2, 1, 28, 28), "features.3")
        >>> out.shape, taps["features.3"].shape
        (torch.Size([2, 8]), torch.Size([2, 8, 1, 1]))
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    with tap(model, paths) as taps:
        if params is None:
            output = model(x, **forward_kwargs)
        else:
            output = functional_call(model, dict(params), (x,), forward_kwargs)
    return output, dict(taps)


__all__ = [
    "DEFAULT_KINDS",
    "check_paths",
    "default_layer_map",
    "module_paths",
    "tap",
    "tap_points",
    "tapped_call",
]

"""Taps: intermediate outputs captured by module path with forward hooks, not by editing ``forward``.

A feature or attention loss needs what a network computes *inside* its forward pass. Instead of
rewriting each backbone's ``forward`` to return extra values, :func:`tapped_call` hooks the named
submodules (``model.get_submodule(path)``, the names of ``model.named_modules()``) for the duration
of one functional call and returns what they produced, in the spirit of torchdistill's forward hooks.

Backbone defaults (:func:`default_tap`): the last conv block of :class:`~lightning_metakd.models.Conv4`
(``features.3``, ``[B, C, h, w]`` after pooling), the last residual block of
:class:`~lightning_metakd.models.ResNet12` (``features.3``) and the final LayerNorm of
:class:`~lightning_metakd.models.VisionTransformer` (``norm``, ``[B, tokens, dim]``); inside a
``Classifier`` each gets the prefix ``backbone.``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from lightning_metakd.models import Conv4, ResNet12, VisionTransformer
from lightning_metakd.models.classifier import Classifier

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

    These are the paths :func:`tapped_call` accepts, in definition order, without the root ``""``.

    Example:
        >>> from torch import nn
        >>> from lightning_metakd.models import Conv4
        >>> module_paths(Conv4(hidden=8), kinds=(nn.Conv2d,))
        ['features.0.0', 'features.1.0', 'features.2.0', 'features.3.0']
    """
    kinds = tuple(kinds) if kinds is not None else (nn.Module,)
    return [name for name, m in model.named_modules() if name and isinstance(m, kinds)]


def default_tap(model: nn.Module) -> str:
    """The path of the usual distillation tap of one of our backbones (see the module docstring).

    Example:
        >>> from lightning_metakd.models import Conv4
        >>> from lightning_metakd.models.classifier import Classifier
        >>> default_tap(Conv4()), default_tap(Classifier(Conv4(), ways=5))
        ('features.3', 'backbone.features.3')
    """
    if isinstance(model, Classifier):
        return f"backbone.{default_tap(model.backbone)}"
    if isinstance(model, (Conv4, ResNet12)):
        return f"features.{len(model.features) - 1}"
    if isinstance(model, VisionTransformer):
        return "norm"
    raise ValueError(
        f"no default tap for {type(model).__name__}; pick a path from module_paths(model), e.g. "
        f"{module_paths(model, kinds=None)[-3:]}."
    )


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


def tapped_call(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    x: Tensor,
    paths: str | Iterable[str],
    **forward_kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """Run ``model`` on ``x`` with ``params`` and return its output and the tapped outputs.

    Registers a forward hook on ``model.get_submodule(path)`` for every path, runs
    ``torch.func.functional_call(model, params, (x,), forward_kwargs)`` (or ``model(x, ...)`` when
    ``params`` is ``None``), removes the hooks in a ``finally`` and returns what the hooked modules
    produced. The captured tensors leave the function as return values, never through state outside
    it, so the call is pure and works per task inside :func:`torch.func.vmap` and under
    :func:`torch.func.grad`: gradients flow through the tapped tensors as through the output.

    A module that runs several times in one forward pass reports its last output; a module that
    does not run raises an error. A module returning a tuple (e.g. ViT's ``Attention``, which
    returns ``(out, attention)``) is reported as that tuple.

    Args:
        model: the network (its structure; ``params`` supplies the values).
        params: ``{name: tensor}`` as for ``functional_call`` (e.g. adapted parameters θ'), or
            ``None`` to use the module's own parameters.
        x: the input, e.g. ``[B, C, H, W]`` images.
        paths: one path or several (``module_paths(model)`` lists candidates; ``""`` is the model).
        **forward_kwargs: keyword arguments of ``model.forward`` (e.g. ``return_attention=True``).

    Returns:
        ``(output, {path: tapped output})``.

    Example:
        >>> import torch
        >>> from lightning_metakd.models import Conv4
        >>> net = Conv4(hidden=8)
        >>> out, taps = tapped_call(net, dict(net.named_parameters()), torch.randn(2, 1, 28, 28),
        ...                         ["features.1", "features.3"])
        >>> out.shape, taps["features.1"].shape, taps["features.3"].shape
        (torch.Size([2, 8]), torch.Size([2, 8, 7, 7]), torch.Size([2, 8, 1, 1]))
    """
    paths = [paths] if isinstance(paths, str) else list(dict.fromkeys(paths))
    modules = {path: _resolve(model, path) for path in paths}
    captured: dict[str, Any] = {}

    def make_hook(path: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[path] = output

        return hook

    handles = [m.register_forward_hook(make_hook(p)) for p, m in modules.items()]
    try:
        if params is None:
            output = model(x, **forward_kwargs)
        else:
            output = functional_call(model, dict(params), (x,), forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    silent = [p for p in paths if p not in captured]
    if silent:
        raise ValueError(
            f"the tapped modules {silent} did not run in {type(model).__name__}.forward; tap a "
            "module on the forward path (see module_paths(model))."
        )
    return output, {p: captured[p] for p in paths}


__all__ = ["DEFAULT_KINDS", "default_tap", "module_paths", "tapped_call"]

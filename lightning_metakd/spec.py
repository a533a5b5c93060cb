"""Describe a component (backbone, algorithm) as ``class_path``/``init_args`` and build it back.

A checkpoint must rebuild its learner without the config that made it. LightningModules here take
components as objects (so LightningCLI configs name them with ``class_path``/``init_args``); these
two functions turn such an object into the same JSON-able description and back, so a checkpoint's
hyperparameters hold everything and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, _PLAIN) for v in value):
        return list(value)
    if isinstance(value, nn.Module):
        return component_spec(value)
    raise TypeError(type(value).__name__)


def component_spec(obj: nn.Module) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` read from ``obj``'s constructor signature.

    Each constructor parameter must be stored on the object under the same name (``self.hidden =
    hidden``) and be a plain value or another such component. Raises ``ValueError`` naming the
    parameter otherwise.

    Example:
        >>> from lightning_metakd.models import Conv4
        >>> component_spec(Conv4(hidden=32))["init_args"]["hidden"]
        32
    """
    cls = type(obj)
    init_args: dict[str, Any] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(obj, name):
            if param.default is not inspect.Parameter.empty:
                continue
            raise ValueError(
                f"{cls.__name__} does not store its constructor argument '{name}' as an attribute, "
                "so a checkpoint cannot rebuild it; store it (self.{0} = {0}).".format(name)
            )
        try:
            init_args[name] = _plain(getattr(obj, name))
        except TypeError as err:
            raise ValueError(
                f"{cls.__name__}.{name} is a {err}, which a checkpoint cannot describe; use plain "
                "values (numbers, strings, lists) or components for constructor arguments."
            ) from None
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def build_component(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a :func:`component_spec` description (nested components included)."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"Cannot import {spec['class_path']} named in the checkpoint: {err}. Install or import the "
            "package that defines it before loading."
        ) from err
    kwargs = {
        k: build_component(v) if isinstance(v, dict) and "class_path" in v else v
        for k, v in spec.get("init_args", {}).items()
    }
    return cls(**kwargs)

"""The distillation terms that ship with the package: one module per term.

Each module holds one term class (:class:`~lightning_metakd.distill.term.DistillationTerm`) and
the pure loss function it computes. This package re-exports what every module lists in its
``__all__``, so a new term is one new file here (plus its test): nothing else to register.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__: list[str] = []
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
del _info, _module, _name

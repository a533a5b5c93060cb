"""Public names that a package imports on first use (PEP 562 module ``__getattr__``).

``import lightning_metakd`` and ``import lightning_metakd.data.kanji_render`` stay cheap (no torch,
no Lightning: about 5 s on a 2-core CPU) while ``from lightning_metakd.data import
KanjiDataModule`` works as an eager import would: the package's ``__init__`` names each export's
module, and the module loads when the name is first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public names live in other modules.

    Args:
        package: the package's ``__name__``.
        exports: ``{public name: the module that defines it}``.

    Reading a name imports its module and keeps the value in the package, so later reads are
    plain attribute reads. A submodule (``package.kanji``) reads as the import would make it.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            if name.startswith("__"):  # probes such as __wrapped__ are not submodules
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as error:
                if error.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__

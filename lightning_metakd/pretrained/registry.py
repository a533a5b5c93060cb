"""The registry of shipped models: ``manifest.json`` beside their weight files, looked up by name.

``pretrained:<name>`` is a checkpoint path like any other: the one checkpoint reader
(:func:`~lightning_metakd.modules.checkpoint.checkpoint_file`) asks :func:`weights_file` for the
file and reads it as it reads a ``best.ckpt``. This module imports nothing of ours and no torch,
so that ``metakd pretrained`` answers at once.

Example:
    >>> list(models())  # doctest: +NORMALIZE_WHITESPACE
    ['kanji-protonet-conv4-64', 'kanji-student-conv4-16',
     'kanji-handwriting-protonet-conv4-64', 'kanji-handwriting-student-conv4-16',
     'kanji-mixed-protonet-conv4-64', 'kanji-mixed-student-conv4-24',
     'kanji-scan-protonet-conv4-64', 'kanji-scan-student-conv4-24']
    >>> name_of("pretrained:kanji-student-conv4-16"), name_of("runs/x/best.ckpt")
    ('kanji-student-conv4-16', None)
    >>> weights_file("kanji-student-conv4-16").name
    'kanji-student-conv4-16.ckpt'
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

#: The prefix that names a shipped model where a checkpoint path is expected.
SCHEME = "pretrained:"
#: The folder of the manifest and the weight files (package data of the wheel).
FOLDER = Path(__file__).resolve().parent
MANIFEST = "manifest.json"


class UnknownPretrainedModel(LookupError):
    """A ``pretrained:`` name that the package does not ship; the message lists the known ones."""


@lru_cache(maxsize=4)
def _read(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        return {"models": []}
    return json.loads(path.read_text())


def manifest(folder: Path | None = None) -> dict[str, Any]:
    """The parsed ``manifest.json`` (``{"format", "models": [...], ...}``); a copy to change."""
    return json.loads(json.dumps(_read(folder or FOLDER)))


def models(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """``{name: manifest entry}`` of the shipped models, in manifest order."""
    return {entry["name"]: entry for entry in manifest(folder)["models"]}


def name_of(path: str | Path) -> str | None:
    """The model name in ``"pretrained:<name>"``, or ``None`` for an ordinary path."""
    text = str(path)
    return text[len(SCHEME) :] if text.startswith(SCHEME) else None


def weights_file(name: str, folder: Path | None = None) -> Path:
    """The weight file of the shipped model ``name``.

    Raises:
        UnknownPretrainedModel: ``name`` is not shipped (the message lists the names that are).
        FileNotFoundError: the manifest names it, but the file is missing from the installation.
    """
    found = models(folder)
    if name not in found:
        known = ", ".join(f"{SCHEME}{n}" for n in found) or "none"
        raise UnknownPretrainedModel(
            f"Unknown pretrained model {name!r}; the package ships: {known} "
            "(`metakd pretrained` lists them)."
        )
    path = (folder or FOLDER) / found[name]["file"]
    if not path.is_file():
        raise FileNotFoundError(
            f"{SCHEME}{name}: the package lacks its weights {path}; reinstall lightning-metakd "
            "(a wheel ships them as package data)."
        )
    return path


__all__ = [
    "FOLDER",
    "MANIFEST",
    "SCHEME",
    "UnknownPretrainedModel",
    "manifest",
    "models",
    "name_of",
    "weights_file",
]

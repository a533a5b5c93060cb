"""Atomic file writes: a reader sees the old file or the whole new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    A process killed mid-write leaves at most a hidden ``.<name>.*.tmp`` file, never a truncated
    ``path``; the rename is made durable by an fsync of the folder where the OS allows it. The
    file gets the usual permissions (``0666`` less the umask), not ``mkstemp``'s ``0600``.

    Example:
        >>> import json, tempfile
        >>> target = Path(tempfile.mkdtemp()) / "done.json"
        >>> atomic_write(target, lambda f: f.write(json.dumps({"ok": True}).encode()))
        >>> json.loads(target.read_text())
        {'ok': True}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

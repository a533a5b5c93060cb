"""pytest plugin: a session that leaves new files behind fails, and lists them.

Snapshots, when the session starts and when it finishes, every path under the repository (tooling
folders aside, see :data:`IGNORED_DIRS`), under the folders that ``conftest.py`` adds (the KanjiVG
caches) and, if it lies outside the repository, the top level of the working directory. New paths
turn a passing session into exit status 1 (pytest returns ``session.exitstatus`` after
``pytest_sessionfinish``) and are listed in the terminal summary. Only new paths count: files that
were there before, such as a user's rendered cache, are not reported.

``tests/conftest.py`` registers it for the suite as ``leftovers``; ``pytest -p no:leftovers`` turns
it off (e.g. while other programs write into the same checkout), and ``pytest -p leftovers`` (with
``tests/`` on the path) loads it alone. It imports nothing heavy, so that loading it costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Folders a test run may create or change in the repository (tooling, not tests' output).
IGNORED_DIRS = {".git", ".venv", "venv", "__pycache__", ".ruff_cache", ".pytest_cache"}
#: Further folders to watch, recursively; ``conftest.py`` puts the KanjiVG cache folders here.
EXTRA_PLACES = pytest.StashKey[list]()

_PLACES = pytest.StashKey[list]()
_BEFORE = pytest.StashKey[set]()
_LEFT = pytest.StashKey[list]()


def snapshot(place: Path, recursive: bool = True) -> set[str]:
    """``place`` and every file and folder under it (only its entries if not ``recursive``).

    Folders in :data:`IGNORED_DIRS` and ``*.egg-info`` are skipped with all they hold.
    """
    if not place.exists():
        return set()
    found = {str(place)}
    if not recursive:
        return found | {str(p) for p in place.iterdir() if not _ignored(p.name)}
    for folder, dirs, files in os.walk(place):
        dirs[:] = [d for d in dirs if not _ignored(d)]
        found.update(os.path.join(folder, name) for name in (*dirs, *files))
    return found


def _ignored(name: str) -> bool:
    return name in IGNORED_DIRS or name.endswith(".egg-info")


def left_behind(before: set[str], after: set[str]) -> list[str]:
    """The new paths of ``after``, a new folder standing for everything inside it."""
    new = after - before
    return sorted(p for p in new if os.path.dirname(p) not in new)


def watched_places(cwd: Path, extra: list[Path]) -> list[tuple[Path, bool]]:
    """``(place, recursive)``: the repository, ``extra``, and the top level of ``cwd`` if elsewhere."""
    places = [(ROOT, True), *((Path(p), True) for p in extra)]
    if not cwd.resolve().is_relative_to(ROOT):
        places.append((cwd, False))
    return places


def take_snapshot(places: list[tuple[Path, bool]]) -> set[str]:
    return set().union(*(snapshot(place, recursive) for place, recursive in places))


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller checks
        return
    places = watched_places(config.invocation_params.dir, config.stash.get(EXTRA_PLACES, []))
    config.stash[_PLACES] = places
    config.stash[_BEFORE] = take_snapshot(places)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    left = left_behind(before, take_snapshot(session.config.stash[_PLACES]))
    if left:
        session.config.stash[_LEFT] = left
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    left = config.stash.get(_LEFT, [])
    if not left:
        return
    terminalreporter.section("files left behind", sep="!", red=True)
    for path in left:
        terminalreporter.line(f"  {path}", red=True)
    terminalreporter.line(
        "The test session created these paths outside its temporary folders. Write to tmp_path "
        "(trainer default_root_dir, logger save_dir, data cache_dir; monkeypatch.chdir for "
        "commands that write to the working directory). If another program wrote them during "
        "the session, run again, or pass -p no:leftovers to skip this check."
    )
    terminalreporter.write_sep(
        "!", f"{len(left)} new path(s) left behind: session failed", red=True
    )

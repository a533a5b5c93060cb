"""``scripts/install_learn2learn.py`` must not replace the numpy, torch and torchvision it finds.

qpth 0.0.18 declares ``numpy<2``; a plain ``pip install qpth`` once downgraded numpy 2 to 1.26 under
``ml_dtypes`` (built against numpy 2), and ``import onnx`` broke in CI. The pip calls are checked
here without running pip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install_learn2learn.py"


@pytest.fixture
def installer():
    spec = importlib.util.spec_from_file_location("install_learn2learn", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dependencies_keep_the_installed_numpy_and_qpth_goes_in_without_its_cap(
    installer, monkeypatch
) -> None:
    installed = {"numpy": "2.4.6", "torch": "2.14.1", "torchvision": "0.29.1", "tqdm": "4.70.1"}
    installed["setuptools"] = "80.0"
    monkeypatch.setattr(installer, "_installed_version", installed.get)
    calls: list[tuple[list[str], str]] = []

    def pip(*args: str, what: str, cwd=None) -> None:
        constraints = [Path(a).read_text() for a in args if a.endswith(".txt")]
        calls.append((list(args), "".join(constraints)))

    monkeypatch.setattr(installer, "_pip", pip)
    installer.install_dependencies()
    (plain, pins), (bare, _) = calls
    assert plain[:2] == ["install", "-c"] and "qpth" not in plain
    assert set(pins.split()) == {"numpy==2.4.6", "torch==2.14.1", "torchvision==0.29.1"}
    assert {"gym==0.26.2", "cvxpy", "scipy", "requests", "cython<3.1"} <= set(plain)
    assert "tqdm" not in plain  # already installed
    assert bare == ["install", "--no-deps", "qpth"]


def test_nothing_missing_means_no_pip_call(installer, monkeypatch) -> None:
    versions = {name: "1.0" for name, _, _ in installer.DEPENDENCIES}
    versions.update({"cython": "3.0.12", "gym": "0.26.2", "setuptools": "80.0"})
    monkeypatch.setattr(installer, "_installed_version", versions.get)
    monkeypatch.setattr(installer, "_pip", lambda *a, **k: pytest.fail(f"pip called: {a}"))
    installer.install_dependencies()

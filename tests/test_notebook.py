"""notebooks/quickstart.ipynb runs top to bottom (tiny mode: METAKD_NOTEBOOK_TINY=1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def outputs_text(notebook) -> str:
    """Everything the cells printed or displayed as text or Markdown."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            data = output.get("data", {})
            parts += [data.get("text/markdown", ""), data.get("text/plain", "")]
    return "\n".join(parts)


def test_notebook_is_valid_and_has_no_stored_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert 'os.environ.get("METAKD_NOTEBOOK_TINY")' in code[0].source


@pytest.mark.slow
def test_notebook_runs_in_tiny_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("METAKD_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("METAKD_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel imports this checkout, whatever the install (an editable install made before
    # the package's __init__.py existed resolves `lightning_metakd` as a namespace package).
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[1]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    text = outputs_text(notebook)
    assert f"tiny=True, outputs in {tmp_path}" in text
    assert "support_x (1, 5, 1, 28, 28)  query_x (1, 75, 1, 28, 28)" in text
    assert "accuracy on this new task:" in text
    rows = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "distilled student", "baseline student"]
    assert "| distilled student |" in text
    assert list((tmp_path / "kanji-cache").glob("kanjivg-*.npz"))  # never the user's cache
    for name in ("teacher", "distill", "student_baseline"):
        assert list((tmp_path / "tensorboard" / name).rglob("events.out.tfevents.*"))

"""The notebooks run top to bottom on the committed H100 results, with no error, quickly."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ["regime_cliff.ipynb", "tuning_report.ipynb"]


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", NB_DIR / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, monkeypatch, tmp_path):
    # the committed results, not a developer's MLX_MOE_TUNE_RESULTS; no user tables either
    monkeypatch.delenv("MLX_MOE_TUNE_RESULTS", raising=False)
    monkeypatch.setenv("MLX_MOE_TUNE_TABLES", str(tmp_path / "no-user-tables"))
    nb = nbformat.read(NB_DIR / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NB_DIR)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError on any error
    elapsed = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no figure"
    assert elapsed < 60, f"{name} took {elapsed:.0f} s"


def test_committed_notebooks_match_their_builder():
    """notebooks/build_notebooks.py is the source: the committed .ipynb must hold its cells."""
    b = _builder()
    for name, make in b.NOTEBOOKS.items():
        want = [(c.cell_type, c.source) for c in make().cells]
        have = [(c.cell_type, c.source) for c in nbformat.read(NB_DIR / name, as_version=4).cells]
        assert have == want, f"{name} is stale: run python notebooks/build_notebooks.py --execute"

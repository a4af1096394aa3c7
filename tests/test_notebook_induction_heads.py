"""Executes experiments/notebooks/induction_heads.ipynb on a tiny configuration (a few-step training run and
tiny lengths passed through environment variables) so that the notebook cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from experiments import induction_heads  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_notebook_runs_on_a_tiny_configuration(tmp_path, monkeypatch):
    out = tmp_path / "ih"
    induction_heads.main(["--output-dir", str(out), "--steps", "2", "--curriculum", "none", "--train-length", "16",
                          "--batch-size", "2",
                          "--min-log2", "3", "--max-log2", "4", "--eval-sequences", "2", "--eval-batch", "2",
                          "--chunk-size", "8", "--skip-falcon", "--no-plot"])
    monkeypatch.setenv("IH_RESULTS_DIR", str(out))
    monkeypatch.setenv("IH_LONG_LENGTH", "96")
    monkeypatch.setenv("IH_CHUNK_SIZE", "32")
    monkeypatch.setenv("IH_DT_LENGTH", "24")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(ROOT / "experiments" / "notebooks" / "induction_heads.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3   # accuracy, state norms, dt
    text = "".join(o.get("text", "") for o in outputs)
    assert "length 96: first trigger at" in text and "dt at the token after the trigger" in text

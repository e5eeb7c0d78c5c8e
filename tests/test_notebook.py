"""notebooks/quickstart.ipynb: executed end to end (nbclient), so the notebook never rots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_notebook_is_clean_and_compiles():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    for cell in code:
        assert not cell.get("outputs"), "commit the notebook without outputs"
        compile(cell.source, "<notebook cell>", "exec")


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch, smollm2_cache):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel is a subprocess: it must find the package and stay offline.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    report = json.loads((tmp_path / "runs" / "notebook" / "report.json").read_text())
    for ds in ("heldout", "ood"):
        ppl = report["perplexity"][ds]
        assert set(ppl) == {"dense", "pruned", "spp", "lora_star"}
        assert ppl["pruned"] > ppl["dense"]
    assert (tmp_path / "runs" / "notebook" / "plots" / "perplexity.png").is_file()
    assert (tmp_path / "runs" / "notebook" / "spp" / "adapter" / "adapter_config.json").is_file()
    outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "2:4 compliance: all layers" in outputs

"""spp_peft.report: numbers, tables, plots and files of a run report."""

from __future__ import annotations

import json
import math

import pytest

from spp_peft import report as R


def _layers(sparsity, n=4):
    return [{"name": f"model.layers.{i}.mlp.up_proj", "shape": [8, 8], "zeros": int(64 * sparsity), "total": 64,
             "pattern": "2:4", "sparsity": sparsity} for i in range(n)]


def _sparsity(value):
    return {"total_sparsity": value, "total_zeros": 0, "total_params": 0, "expected_pattern": "2:4",
            "noncompliant_layers": [], "layers": _layers(value)}


@pytest.fixture
def results():
    return {
        "name": "unit",
        "model": "tiny",
        "pruning": {"method": "wanda", "pattern": "2:4", "sparsity": 0.5,
                    "calibration": {"source": "builtin", "nsamples": 4, "seqlen": 32}},
        "perplexity": {
            "heldout": {"dense": 10.0, "pruned": 100.0, "spp": 10 ** 1.5, "lora_star": 50.0},
            "ood": {"dense": 20.0, "pruned": 80.0, "spp": 40.0, "lora_star": 90.0},
        },
        "datasets": {"heldout": {"source": "builtin:heldout", "tokens": 4096},
                     "ood": {"source": "builtin:ood", "tokens": 4096}},
        "training": {
            "spp": {"steps": 3, "tokens": 3072, "seconds": 12.0, "lr": 0.03,
                    "losses": [[1, 3.0], [2, 2.5], [3, 2.2]]},
            "lora_star": {"steps": 3, "tokens": 3072, "seconds": 10.0, "lr": 0.01,
                          "losses": [[1, 3.0], [2, 2.7], [3, 2.6]]},
        },
        "sparsity": {"pruned": _sparsity(0.5), "spp": _sparsity(0.5), "lora_star": _sparsity(0.5)},
        "verified": {"spp": {"ok": True, "layers": 4, "message": "identical"},
                     "lora_star": {"ok": False, "layers": 4, "message": "1 zero filled"}},
        "export": {"spp": "/tmp/x/merged/spp"},
        "budget": {"batch_size": 4, "seqlen": 256},
        "timings": {"load": 1.0, "train spp": 12.0},
        "seconds": 90.0,
    }


def test_recovered_is_the_share_of_the_log_perplexity_gap(results):
    assert R.recovered(results, "heldout", "spp") == pytest.approx(0.5)
    assert R.recovered(results, "heldout", "dense") == pytest.approx(1.0)
    assert R.recovered(results, "heldout", "pruned") == pytest.approx(0.0)
    expected = (math.log(80) - math.log(90)) / (math.log(80) - math.log(20))
    assert R.recovered(results, "ood", "lora_star") == pytest.approx(expected)  # negative: worse than pruned
    assert R.recovered(results, "ood", "missing") is None
    no_gap = {"perplexity": {"x": {"dense": 5.0, "pruned": 4.0, "spp": 3.0}}}
    assert R.recovered(no_gap, "x", "spp") is None


def test_table_rows_and_text(results):
    rows = {row["model"]: row for row in R.result_rows(results)}
    assert list(rows) == ["dense", "pruned", "spp", "lora_star"]
    assert rows["spp"]["verified"] is True and rows["lora_star"]["verified"] is False
    assert rows["spp"]["ppl:heldout"] == pytest.approx(31.6227766)
    text = R.format_table(results)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["model", "ppl", "heldout"]
    spp_line = next(line for line in lines if line.startswith("SPP"))
    assert "31.62" in spp_line and "50%" in spp_line and "yes" in spp_line
    assert "NO" in next(line for line in lines if line.startswith("LoRA*"))
    results["training"]["spp"]["resumed_from"] = "/run/spp/checkpoints/checkpoint-3"
    assert "12 (resumed)" in next(line for line in R.format_table(results).splitlines() if line.startswith("SPP"))
    md = R.format_table(results, markdown=True)
    assert md.splitlines()[1].startswith("|---")


def test_write_report_files_and_plots(results, tmp_path):
    written = R.write_report(results, tmp_path)
    for key in ("json", "md", "loss", "perplexity", "sparsity"):
        assert written[key].is_file(), key
    for key in ("loss", "perplexity", "sparsity"):
        data = written[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = written["md"].read_text()
    assert "![loss](plots/loss.png)" in md and "| SPP |" in md and "FAILED" in md
    assert "4 x 32 tokens of `builtin`" in md
    back = R.read_report(tmp_path)
    assert back["perplexity"] == results["perplexity"]
    assert [row["model"] for row in back["table"]] == ["dense", "pruned", "spp", "lora_star"]
    assert json.loads(written["json"].read_text())["name"] == "unit"


def test_report_without_matplotlib_says_so(results, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "_pyplot", lambda: None)
    written = R.write_report(results, tmp_path)
    assert set(written) == {"json", "md"}
    assert "Plots skipped: matplotlib is not installed" in written["md"].read_text()


def test_zero_shot_section(results, tmp_path):
    results["zero_shot"] = {"dense": {"boolq": 0.61, "rte": 0.55}, "spp": {"boolq": 0.6, "rte": 0.52}}
    md = R.write_report(results, tmp_path, plots=False)["md"].read_text()
    assert "| SPP | 0.6000 | 0.5200 |" in md

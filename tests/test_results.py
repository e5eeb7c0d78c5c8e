"""spp_peft.results: the typed results of a run and their dict form (report.json)."""

from __future__ import annotations

import json

from spp_peft.results import ModelResult, RunResults, Verification, as_results


def _report_dict() -> dict:
    return {
        "name": "unit", "model": "tiny", "output_dir": "/tmp/run", "recipe": {"name": "unit"},
        "perplexity": {"heldout": {"dense": 10.0, "pruned": 100.0, "spp": 30.0}},
        "datasets": {"heldout": {"source": "builtin:heldout", "tokens": 4096}},
        "training": {"spp": {"steps": 3, "tokens": 3072, "seconds": 12.0, "lr": 0.03, "losses": [[1, 3.0]]}},
        "sparsity": {"pruned": {"total_sparsity": 0.5, "layers": []}},
        "verified": {"spp": {"ok": True, "layers": 4, "message": "identical"}},
        "export": {"spp": "/tmp/run/merged/spp"},
        "zero_shot": {},
        "timings": {"load": 1.0}, "cpu_seconds": {"load": 0.5},
        "environment": {"python": "3.11"},
        "budget": {"steps": 3, "epochs": None, "batch_size": 4, "seqlen": 256},
        "pruning": {"method": "wanda", "pattern": "2:4"},
        "data": {"examples": 8, "tokens": 2048},
        "seconds": 90.0,
        "table": [{"model": "dense"}],
    }


def test_the_dict_form_round_trips_with_its_key_order():
    data = _report_dict()
    results = RunResults.from_dict(data)
    assert results.verified["spp"] == Verification(True, 4, "identical")
    assert results.datasets["heldout"].tokens == 4096 and results.budget.batch_size == 4
    assert results.timings.total == 90.0 and results.extra == {"table": [{"model": "dense"}]}
    back = results.to_dict()
    assert back == data and list(back) == list(data)
    assert json.loads(json.dumps(back)) == data


def test_a_partial_dict_and_model_results():
    results = as_results({"name": "nb", "perplexity": {"x": {"pruned": 5.0}}})
    assert as_results(results) is results
    assert results.budget is None and "budget" not in results.to_dict()
    results.add(ModelResult("spp", perplexity={"x": 4.0}, verified=Verification(True, 2, "ok"), export="/out"))
    results.add(ModelResult("none", perplexity={"x": 5.0}, zero_shot={}))
    data = results.to_dict()
    assert data["perplexity"] == {"x": {"pruned": 5.0, "spp": 4.0, "none": 5.0}}
    assert data["verified"] == {"spp": {"ok": True, "layers": 2, "message": "ok"}}
    assert data["export"] == {"spp": "/out"} and data["zero_shot"] == {} and data["training"] == {}


def test_the_budget_records_the_setting_that_governs():
    from spp_peft.results import Budget

    # max_steps > 0 overrides epochs, as in TrainingArguments: the ignored epochs are not reported as run.
    assert Budget.governing(4, 3.0, 8, 256) == Budget(steps=4, epochs=None, batch_size=8, seqlen=256)
    assert Budget.governing(-1, 3.0, 8, 256) == Budget(steps=None, epochs=3.0, batch_size=8, seqlen=256)

"""spp_peft.pipeline: the whole chain on a tiny model; its typed results are what report.json holds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from spp_peft import pipeline as P
from spp_peft.export import SPARSITY_CONFIG_KEY
from spp_peft.recipe import load_recipe
from spp_peft.sparsity import assert_same_sparsity

from ._pipeline_fixtures import one_thread, save_dense  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_dense(tmp_path_factory.mktemp("tiny"))


def _recipe(tiny_dir, out, **sections):
    data = {
        "name": "t",
        "output_dir": str(out),
        "model": {"name_or_path": str(tiny_dir)},
        "pruning": {"method": "wanda", "pattern": "2:4", "nsamples": 4, "seqlen": 32},
        "data": {"cutoff_len": 32, "max_samples": 16},
        "train": {"methods": ["spp", "lora_star", "masked_lora", "none"], "max_steps": 2, "batch_size": 2,
                  "r": 4, "alpha": 8, "lr": 1e-2, "method_lr": {"lora_star": 5e-3}, "progress": False},
        "eval": {"seqlen": 32, "max_tokens": 256},
        "export": {"methods": ["spp", "masked_lora"]},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return load_recipe(data)


def test_run_end_to_end(tiny_dir, tmp_path):
    recipe = _recipe(tiny_dir, tmp_path / "run")
    lines = []
    results = P.run(recipe, show_progress=False, echo=lines.append)
    out = tmp_path / "run"
    # Every model evaluated on both sets; `none` is the pruned model.
    for ds in ("heldout", "ood"):
        table = results.perplexity[ds]
        assert set(table) == {"dense", "pruned", "spp", "lora_star", "masked_lora", "none"}
        assert table["none"] == table["pruned"]
        assert all(v > 1 for v in table.values())
    # Same budget for every trained method; per-method learning rate recorded.
    steps = {m: t["steps"] for m, t in results.training.items()}
    assert steps == {"spp": 2, "lora_star": 2, "masked_lora": 2}
    assert results.training["lora_star"]["lr"] == 5e-3 and results.training["spp"]["lr"] == 1e-2
    assert all(v.ok for v in results.verified.values())
    assert results.sparsity["spp"]["total_sparsity"] == pytest.approx(0.5)
    # Files.
    for name in ("recipe.yaml", "run.log", "report.md", "report.json", "plots/loss.png", "pruned/config.json",
                 "spp/adapter/adapter_config.json", "lora_star/train_log.json"):
        assert (out / name).is_file(), name
    assert load_recipe(str(out / "recipe.yaml")).to_dict() == recipe.to_dict()
    # report.json is the results' dict (the report's own timing and paths come after it is written).
    saved = json.loads((out / "report.json").read_text())
    assert saved.pop("table")
    expected = json.loads(json.dumps(results.to_dict()))
    del expected["report"], expected["timings"]["report"], expected["cpu_seconds"]["report"]
    assert saved == expected and list(saved) == list(expected)
    # The budget that ran (max_steps overrode epochs) and the versions the numbers come from.
    assert saved["budget"]["steps"] == 2 and saved["budget"]["epochs"] is None
    for name in ("spp_peft", "torch", "transformers", "peft", "accelerate", "datasets", "lm_eval", "trl",
                 "bitsandbytes"):
        assert name in saved["environment"], name
    assert saved["environment"]["spp_peft"] and saved["environment"]["accelerate"]
    assert P.RunResults.from_dict(saved).to_dict() == saved
    assert "SPP" in lines[-3] or any(line.startswith("SPP") for line in "\n".join(lines).splitlines())
    # The exported models: safetensors, sparsity metadata, the pruned base's zeros.
    pruned_state = load_file(str(out / "pruned" / "model.safetensors"))
    for method in ("spp", "masked_lora"):
        folder = out / "merged" / method
        config = json.loads((folder / "config.json").read_text())
        meta = config[SPARSITY_CONFIG_KEY]
        assert meta["method"] == method and meta["pattern"] == "2:4"
        assert meta["total_sparsity"] == pytest.approx(0.5)
        assert config["spp_pruning"]["method"] == "wanda"
        state = load_file(str(folder / "model.safetensors"))
        layers = {f"{n}.weight" for n in meta["layers"]}
        assert len(layers) == 14
        assert_same_sparsity({k: pruned_state[k] for k in layers}, {k: state[k] for k in layers})
        assert any(not torch.equal(pruned_state[k], state[k]) for k in layers), "the export must be fine-tuned"
    assert not (out / "merged" / "lora_star").exists()
    assert not list((out / "merged").glob(".*tmp*"))


def test_zero_shot_bridge_scores_the_in_memory_model(tmp_path):
    """lm-eval's HFLM on the in-memory model: the accuracy equals a hand computation of the same choices."""
    pytest.importorskip("lm_eval")
    from spp_peft.evaluation import zero_shot

    from ._pipeline_fixtures import make_tiny

    model, tokenizer = make_tiny()
    docs = [{"question": f"Q{i}: pick one", "choices": ["alpha", "beta", "gamma"], "answer": i % 3} for i in range(20)]
    data = tmp_path / "choice.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: spp_tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    scores = zero_shot(model, tokenizer, ["spp_tiny_choice"], include_path=str(tmp_path),
                        include_defaults=False, batch_size=2)

    def loglik(context, continuation):  # byte tokenizer: one token per byte
        ctx, cont = tokenizer(context)["input_ids"], tokenizer(continuation)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))

    hits = [max(range(3), key=lambda c: loglik(d["question"], " " + d["choices"][c])) == d["answer"] for d in docs]
    assert scores["spp_tiny_choice"] == pytest.approx(sum(hits) / len(hits))


def test_run_on_an_already_pruned_model(tmp_path):
    """pruning.method: none takes the model as it is (here: a pruned model saved by `spp-peft prune`)."""
    from ._pipeline_fixtures import save_pruned_tiny

    pruned_dir = save_pruned_tiny(tmp_path / "pruned_in")
    recipe = load_recipe({
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(pruned_dir)},
        "pruning": {"method": "none"},
        "data": {"cutoff_len": 32, "max_samples": 8},
        "train": {"methods": ["spp"], "max_steps": 1, "batch_size": 2, "r": 4, "progress": False},
        "eval": {"seqlen": 32, "max_tokens": 128, "dense": False, "datasets": {"heldout": "builtin:heldout"}},
        "report": {"plots": False},
    })
    results = P.run(recipe, show_progress=False, echo=None)
    assert results.pruning["method"] == "magnitude"  # the metadata the input model carries
    assert set(results.perplexity["heldout"]) == {"pruned", "spp"}
    assert results.verified["spp"].ok and results.verified["spp"].layers == 14
    assert (tmp_path / "run" / "merged" / "spp" / "model.safetensors").is_file()

"""spp_peft.training: the methods (SPP, LoRA*, masked LoRA), Trainer glue, checkpoints/resume, data."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from spp_peft import training as T
from spp_peft.data import (
    IGNORE_INDEX,
    alpaca_prompt,
    lm_windows,
    load_records,
    token_stream,
    tokenize_instruction,
)
from spp_peft.sparsity import SparsityViolation, assert_same_sparsity

from ._pipeline_fixtures import one_thread, pruned_tiny  # noqa: F401 (one_thread: autouse fixture)

CFG = dict(r=4, alpha=8, lr=1e-2, batch_size=2, progress=False, logging_steps=1)


def _randomize(peft_model, seed=1):
    """Give the adapter non-trivial values (B starts at zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "spp_B" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _lora_layers(peft_model):
    from peft.tuners.lora.layer import Linear as LoraLinear

    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)}


@pytest.fixture(scope="module")
def pruned():
    model, tokenizer, _ = pruned_tiny()
    return model, tokenizer


@pytest.fixture(scope="module")
def dataset(pruned):
    return T.build_dataset(pruned[1], T.DataConfig(cutoff_len=32, max_samples=24))


# -------------------------------------------------------------------------------------- masked LoRA


def test_masked_lora_forward_is_w_plus_masked_update(pruned):
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), "masked_lora", T.TrainConfig(**CFG))
    _randomize(model)
    name, layer = next(iter(_lora_layers(model).items()))
    weight = layer.get_base_layer().weight.detach()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    scale = layer.scaling["default"]
    assert scale == 2.0
    x = torch.randn(3, 5, weight.shape[1])
    keep = weight != 0
    expected = F.linear(x, weight + scale * (b @ a) * keep)
    unmasked = F.linear(x, weight + scale * (b @ a))
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unmasked, atol=1e-3), "the mask must change the output"


def test_masked_lora_gradient_matches_explicit_formula(pruned):
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), "masked_lora", T.TrainConfig(**CFG))
    _randomize(model)
    layer = next(iter(_lora_layers(model).values()))
    weight = layer.get_base_layer().weight.detach()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(4, weight.shape[1])
    layer(x).pow(2).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.linear(x, weight + 2.0 * (b2 @ a2) * (weight != 0)).pow(2).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-5)


def test_masked_lora_merge_equals_forward_and_unmerge_restores(pruned):
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), "masked_lora", T.TrainConfig(**CFG))
    _randomize(model)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        after = model(input_ids=ids).logits
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    for layer in _lora_layers(model).values():  # unmerge gives back the pruned zeros exactly
        assert torch.equal(layer.get_base_layer().weight == 0, ~getattr(layer, T.MASK_BUFFER))


# ------------------------------------------------------------------------------------ merge per method


@pytest.mark.parametrize("method", ["spp", "lora_star", "masked_lora"])
def test_merge_keeps_the_pruned_zero_set(pruned, method):
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), method, T.TrainConfig(**CFG))
    _randomize(model)
    merged = T.merge(model, method)
    assert_same_sparsity(base, merged)
    changed = sum(int((w1 != w0).sum()) for (w0, w1) in zip(
        [m.weight for m in base.modules() if isinstance(m, torch.nn.Linear)],
        [m.weight for m in merged.modules() if isinstance(m, torch.nn.Linear)]))
    assert changed > 0, "the adapter must have changed the weights"


def test_lora_star_is_the_remasked_lora_merge(pruned):
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), "lora_star", T.TrainConfig(**CFG))
    _randomize(model)
    name, layer = next(iter(_lora_layers(model).items()))
    key = name.removeprefix("base_model.model.")
    w = layer.get_base_layer().weight.detach().clone()
    delta = layer.get_delta_weight("default").detach()
    merged = T.merge(model, "lora_star")
    torch.testing.assert_close(merged.get_submodule(key).weight, (w + delta) * (w != 0))


def test_plain_lora_merge_fills_zeros(pruned):
    """The control: without the re-mask, a LoRA merge breaks the sparsity (what LoRA* and SPP avoid)."""
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), "lora_star", T.TrainConfig(**CFG))
    _randomize(model)
    with pytest.raises(SparsityViolation, match="zero weight"):
        assert_same_sparsity(base, model.merge_and_unload())


def test_none_method_is_the_model_itself(pruned):
    base, _ = pruned
    assert T.prepare_model(base, "none", T.TrainConfig(**CFG)) is base
    assert T.merge(base, "none") is base
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        T.prepare_model(base, "qlora", T.TrainConfig(**CFG))


# ------------------------------------------------------------------------------------------- Trainer


class _StopAt:
    """A TrainerCallback that interrupts training after ``step`` steps (a crash, for the resume test)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True
                return control

        return Stop()


def _spp_b(model):
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "spp_B" in n])


def test_diverged_training_stops_early_and_saves_nothing(pruned, dataset, tmp_path):
    from spp_peft.errors import TrainingDiverged

    base, tokenizer = pruned
    cfg = T.TrainConfig(**dict(CFG, lr=1e30), max_steps=40)
    with pytest.raises(TrainingDiverged, match=r"non-finite adapter weights .* by step (\d|1\d) with lr=1e\+30"):
        T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, tmp_path)
    assert not (tmp_path / "adapter").exists()


def test_train_saves_adapter_and_resume_equals_uninterrupted(pruned, dataset, tmp_path):
    base, tokenizer = pruned
    cfg = T.TrainConfig(**CFG, max_steps=6, save_steps=2)
    # Uninterrupted run.
    full = T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, tmp_path / "a")
    assert full.steps == 6 and len(full.losses) == 6
    assert full.losses[-1][1] < full.losses[0][1] + 1.0
    adapter = tmp_path / "a" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    info = json.loads((adapter / T.METHOD_FILE).read_text())
    assert info["method"] == "spp" and info["result"]["steps"] == 6
    card = (adapter / "README.md").read_text()
    assert "SPP adapter" in card and "Training (spp-peft)" in card
    # Interrupted after 4 steps, then resumed: same adapter as the uninterrupted run.
    first = T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg,
                    tmp_path / "b", callbacks=[_StopAt(4)])
    assert first.steps == 4 and first.resumed_from is None
    resumed = T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, tmp_path / "b")
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-4")
    assert resumed.steps == 6
    torch.testing.assert_close(_spp_b(resumed.model), _spp_b(full.model), rtol=1e-5, atol=1e-6)
    assert resumed.losses[:4] == first.losses
    # A finished run resumes from its last checkpoint without training again, to the same adapter.
    again = T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, tmp_path / "a")
    assert again.resumed_from.endswith("checkpoint-6") and again.steps == 6 and again.losses == full.losses
    torch.testing.assert_close(_spp_b(again.model), _spp_b(full.model))


def test_changed_settings_do_not_resume_old_checkpoints(pruned, dataset, tmp_path):
    base, tokenizer = pruned
    cfg = T.TrainConfig(**CFG, max_steps=2, save_steps=2)
    T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, tmp_path)
    other = T.TrainConfig(**{**CFG, "lr": 5e-2}, max_steps=2, save_steps=2)
    again = T.train(T.prepare_model(copy.deepcopy(base), "spp", other), tokenizer, "spp", dataset, other, tmp_path,
                    lr=5e-2)
    assert again.resumed_from is None and again.steps == 2


def test_gradient_checkpointing_trains_the_same(pruned, dataset, tmp_path):
    base, tokenizer = pruned
    runs = []
    for i, gc in enumerate((False, True)):
        cfg = T.TrainConfig(**CFG, max_steps=2, gradient_checkpointing=gc)
        model = T.prepare_model(copy.deepcopy(base), "spp", cfg)
        model.train()
        runs.append(T.train(model, tokenizer, "spp", dataset, cfg, tmp_path / str(i)))
        assert model.base_model.model.is_activation_checkpointing is gc
    torch.testing.assert_close(_spp_b(runs[0].model), _spp_b(runs[1].model), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["spp", "lora_star", "masked_lora"])
def test_saved_adapter_loads_back_to_the_same_merged_model(pruned, tmp_path, method):
    base, _ = pruned
    cfg = T.TrainConfig(**CFG)
    model = T.prepare_model(copy.deepcopy(base), method, cfg)
    _randomize(model)
    T.save_adapter(model, tmp_path, method, cfg, lr=cfg.lr)
    assert T.read_method(tmp_path) == method
    loaded, loaded_method = T.load_trained(copy.deepcopy(base), tmp_path)
    assert loaded_method == method
    a, b = T.merge(model, method), T.merge(loaded, method)
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2)


# ----------------------------------------------------------------------------------------------- data


def test_text_windows_are_the_token_stream_cut_without_overlap(pruned):
    tokenizer = pruned[1]
    texts = ["first document " * 20, "second one " * 30]
    windows = lm_windows(tokenizer, texts, 16)
    stream = token_stream(tokenizer, texts)
    assert windows.shape == (stream.numel() // 16, 16)
    assert torch.equal(windows.reshape(-1), stream[: windows.numel()])
    ds = T.build_dataset(tokenizer, T.DataConfig(source="builtin", cutoff_len=16, max_samples=5))
    assert len(ds) == 5 and all(torch.equal(e["input_ids"], e["labels"]) for e in ds.examples)


def test_alpaca_template_and_train_on_inputs(pruned):
    tokenizer = pruned[1]
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    prompt = alpaca_prompt(record["instruction"], record["input"])
    assert "### Input:\n2 and 3" in prompt and prompt.endswith("### Response:\n")
    n_prompt = len(tokenizer(prompt)["input_ids"])
    full = tokenize_instruction(tokenizer, record, "alpaca", 4096, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]
    assert full["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(full["input_ids"][:n_prompt]) == prompt
    masked = tokenize_instruction(tokenizer, record, "alpaca", 4096, train_on_inputs=False)
    assert masked["input_ids"] == full["input_ids"]
    assert masked["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert masked["labels"][n_prompt:] == full["input_ids"][n_prompt:]
    cut = tokenize_instruction(tokenizer, record, "alpaca", 10, train_on_inputs=True)
    assert len(cut["input_ids"]) == 10
    no_input = alpaca_prompt("Say hi.")
    assert "### Input" not in no_input


def test_chat_format_masks_the_prompt(pruned):
    tokenizer = copy.deepcopy(pruned[1])
    record = {"instruction": "Hi?", "output": "Hello."}
    with pytest.raises(ValueError, match="chat template"):
        tokenize_instruction(tokenizer, record, "chat", 512)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    out = tokenize_instruction(tokenizer, record, "chat", 512, train_on_inputs=False)
    text = tokenizer.decode(out["input_ids"])
    assert text == "<user>Hi?</s><assistant>Hello.</s>"
    n_prompt = len("<user>Hi?</s><assistant>")  # one token per byte
    assert out["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tokenizer.decode(out["labels"][n_prompt:]) == "Hello.</s>"


def test_instruction_dataset_trains(pruned, tmp_path):
    base, tokenizer = pruned
    records = tmp_path / "data.jsonl"
    records.write_text("\n".join(json.dumps({"instruction": f"Count to {i}.", "input": "",
                                             "output": " ".join(str(j) for j in range(i))}) for i in range(2, 10)))
    ds = T.build_dataset(tokenizer, T.DataConfig(source=str(records), format="alpaca", cutoff_len=256,
                                                 train_on_inputs=False))
    assert len(ds) == 8
    cfg = T.TrainConfig(**CFG, max_steps=2)
    result = T.train(T.prepare_model(copy.deepcopy(base), "masked_lora", cfg), tokenizer, "masked_lora", ds, cfg,
                     tmp_path / "run")
    assert result.steps == 2 and all(loss == loss for _, loss in result.losses)  # finite, padded batches work


def test_load_records_sources(tmp_path):
    train, held = load_records("builtin:instructions"), load_records("builtin:instructions:heldout")
    assert train and held
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert len(load_records("builtin:instructions", max_samples=3)) == 3
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="folder"):
        load_records(str(tmp_path))


def test_config_validation():
    with pytest.raises(ValueError, match="lr"):
        T.TrainConfig(lr=0).validate()
    with pytest.raises(ValueError, match="format"):
        T.DataConfig(format="sharegpt").validate()
    # NaN and inf pass `x > 0`; they must not reach the Trainer (an all-NaN adapter would be saved).
    for bad in (dict(lr=float("inf")), dict(lr=float("nan")), dict(alpha=float("nan")), dict(alpha=1e40),
                dict(epochs=float("inf"), max_steps=-1), dict(warmup=float("inf")), dict(weight_decay=float("nan"))):
        with pytest.raises(ValueError, match="finite"):
            T.TrainConfig(**bad).validate()
    # What TrainingArguments would refuse only when the Trainer is built (after pruning), refused up front.
    with pytest.raises(ValueError, match="train.optim: unknown value 'bogus'; choose one of adamw_torch"):
        T.TrainConfig(optim="bogus").validate()
    with pytest.raises(ValueError, match="train.lr_scheduler: unknown value 'bogus'; choose one of linear"):
        T.TrainConfig(lr_scheduler="bogus").validate()

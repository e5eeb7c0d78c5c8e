"""SPP on a quantized base (bitsandbytes 4-bit NF4/FP4 and 8-bit, CPU): trains, merges without filling a zero,
reports the zeros requantization adds, survives the CPU repacking trap, saves and loads."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

from spp_peft import SPPConfig
from spp_peft.tuner.bnb import QuantizedLinear, dequantized_weight, quantized_kind

from .conftest import MODEL_TARGETS, build, inputs_for, prune_model_

bnb = pytest.importorskip("bitsandbytes")

MODES = {
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


def quantized_base(tmp_path, mode: str, device: str = "cpu"):
    """The pruned tiny Llama saved in full precision and loaded back quantized, as users load a 7B model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tmp_path / "pruned"
    if not folder.exists():
        prune_model_(build("llama"), "llama", "2:4").save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**MODES[mode]),
                                                    device_map=device)


def zeros_of(model):
    return {n: dequantized_weight(m.get_base_layer() if hasattr(m, "get_base_layer") else m) == 0
            for n, m in model.named_modules()
            if not n.endswith(".base_layer") and quantized_kind(getattr(m, "base_layer", m))}


def _train(model, steps=6, lr=5e-2, device="cpu"):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = inputs_for("llama", batch=4)["input_ids"].to(device)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", list(MODES))
def test_qlora_style_spp_trains_and_merges_keeping_every_zero(tmp_path, mode):
    model = get_peft_model(quantized_base(tmp_path, mode), SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4))
    layers = model.base_model.spp_layers()
    assert len(layers) == 14 and all(isinstance(layer, QuantizedLinear) for layer in layers.values())
    before = {n.removeprefix("base_model.model."): z for n, z in zeros_of(model).items()}
    ids = inputs_for("llama")["input_ids"]
    model.eval()
    with torch.no_grad():  # the eval forward that repacks a Linear4bit on AVX512-BF16 CPUs, before training
        model(input_ids=ids)
    losses = _train(model)
    assert losses[-1] < losses[0]
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads  # factors got gradients (the repack trap silently stops them)
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model(input_ids=ids)  # again, right before merging
    merged = model.merge_and_unload()
    with torch.no_grad():
        after_logits = merged(input_ids=ids).logits
    scale = unmerged.abs().max()
    assert (after_logits - unmerged).abs().max() <= 0.25 * scale  # within quantization tolerance
    after = zeros_of(merged)
    for name, zeros in before.items():
        assert not (zeros & ~after[name]).any(), f"{name}: a zero of the base was filled"
    report = getattr(merged, "spp_merge_report", {})
    assert all(isinstance(v, int) and v > 0 for v in report.values())
    added = {n: int((after[n] & ~before[n]).sum()) for n in before}
    assert {n.removeprefix("base_model.model."): v for n, v in report.items()} == {n: v for n, v in added.items() if v}


def test_explicit_strict_refuses_zeros_added_by_requantization(tmp_path):
    model = get_peft_model(quantized_base(tmp_path, "nf4-fp32"),
                           SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4, init_weights=False,
                                     sparsity_check="strict"))
    with torch.no_grad():
        for layer in model.base_model.spp_layers().values():
            layer.spp_B["default"].mul_(20)  # large factors: requantizing W * (1 + D) rounds weights to 0
    from spp_peft import SparsityViolation

    with pytest.raises(SparsityViolation, match="non-zero weight"):
        model.merge_and_unload()
    assert all(not layer.merged for layer in model.base_model.spp_layers().values())


def test_adapter_trained_on_a_4bit_base_saves_and_loads(tmp_path):
    model = get_peft_model(quantized_base(tmp_path, "nf4-fp32"), SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4))
    _train(model, steps=2)
    ids = inputs_for("llama")["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(quantized_base(tmp_path, "nf4-fp32"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_adapter_trained_on_4bit_merges_into_the_full_precision_pruned_base(tmp_path):
    """The QLoRA deployment: train on the 4-bit copy, merge into the full-precision pruned model."""
    from transformers import AutoModelForCausalLM

    import spp_peft
    from spp_peft import SparsityViolation
    from spp_peft.sparsity import assert_same_sparsity

    model = get_peft_model(quantized_base(tmp_path, "nf4-fp32"), SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4))
    _train(model, steps=3)
    model.save_pretrained(tmp_path / "adapter")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    merged = spp_peft.merge_into(full, str(tmp_path / "adapter"))
    assert_same_sparsity(reference, merged)  # exactly the full-precision base's zeros
    q = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, reference.model.layers[0].self_attn.q_proj.weight)  # the adapter is in
    other = prune_model_(build("llama"), "llama", "4:8")
    with pytest.raises(SparsityViolation, match="q_proj"):
        spp_peft.merge_into(other, str(tmp_path / "adapter"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", list(MODES))
def test_qlora_style_spp_on_cuda(tmp_path, mode):
    """The same on a GPU (run by `make gpu-check`): trains, merges into the quantized base keeping every zero."""
    model = get_peft_model(quantized_base(tmp_path, mode, "cuda:0"),
                           SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4))
    before = {n.removeprefix("base_model.model."): z.cpu() for n, z in zeros_of(model).items()}
    losses = _train(model, device="cuda:0")
    assert losses[-1] < losses[0]
    merged = model.merge_and_unload()
    after = {n: z.cpu() for n, z in zeros_of(merged).items()}
    assert all(not (before[n] & ~after[n]).any() for n in before)

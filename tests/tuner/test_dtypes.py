"""fp32 / fp16 / bf16 bases, autocast, and gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from spp_peft import SPPConfig, assert_same_sparsity

from .conftest import MODEL_TARGETS, build, inputs_for, outputs, prune_model_

TOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2}


def adapted(kind, pattern, dtype, seed=0):
    base = prune_model_(build(kind, seed), kind, pattern)
    reference = get_peft_model(copy.deepcopy(base), SPPConfig(target_modules=MODEL_TARGETS[kind], r=2,
                                                               spp_alpha=4, init_weights=False))
    low = copy.deepcopy(reference).to(dtype)
    # PEFT keeps adapter weights in fp32 over half-precision bases; re-apply after .to(dtype) like a user would.
    for name, param in low.named_parameters():
        if "spp_" in name:
            param.data = param.data.float()
    return base.to(dtype), reference, low


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["unstructured50", "2:4", "unstructured75"])
def test_half_precision_forward_merge_keep_zeros(kind, pattern, dtype):
    pruned, reference, model = adapted(kind, pattern, dtype)
    inputs = inputs_for(kind)
    if kind == "mlp":
        inputs_low = {"x": inputs["x"].to(dtype)}
    else:
        inputs_low = inputs
    with torch.no_grad():
        expected = outputs(reference, inputs).float()
        got = outputs(model, inputs_low).float()
        torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype])
        merged = model.merge_and_unload()
        torch.testing.assert_close(outputs(merged, inputs_low).float(), got, rtol=TOL[dtype], atol=TOL[dtype])
    assert all(p.dtype == dtype for n, p in merged.named_parameters())
    assert_same_sparsity(pruned, merged)


def test_adapter_weights_are_fp32_over_bf16_base_and_train():
    base = prune_model_(build("llama"), "llama", "2:4").to(torch.bfloat16)
    model = get_peft_model(base, SPPConfig(target_modules=MODEL_TARGETS["llama"], r=2, init_weights=False))
    spp_params = {n: p for n, p in model.named_parameters() if "spp_" in n}
    assert spp_params and all(p.dtype == torch.float32 for p in spp_params.values())
    model.train()
    outputs(model, inputs_for("llama")).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in spp_params.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "spp_" not in n)


def test_cpu_autocast_bf16():
    base = prune_model_(build("llama"), "llama", "2:4")
    model = get_peft_model(base, SPPConfig(target_modules=MODEL_TARGETS["llama"], r=2, init_weights=False))
    inputs = inputs_for("llama")
    with torch.no_grad():
        expected = outputs(model, inputs)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = outputs(model, inputs)
        loss = logits.float().pow(2).mean()
    loss.backward()
    torch.testing.assert_close(logits.float(), expected, rtol=0.1, atol=0.1)
    assert all(p.grad is not None for n, p in model.named_parameters() if "spp_" in n)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        base = prune_model_(build("llama", seed=3), "llama", "2:4")
        torch.manual_seed(4)
        model = get_peft_model(base, SPPConfig(target_modules=MODEL_TARGETS["llama"], r=2, init_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        ids = inputs_for("llama")["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)

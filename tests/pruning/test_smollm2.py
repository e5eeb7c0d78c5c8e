"""End-to-end pruning of the real SmolLM2-135M: held-out perplexity ranks the methods as the papers do.

Sizes are kept small for 2 CPU cores (8 x 256 calibration tokens, 2048 held-out tokens): the gaps at 50%
between magnitude and the calibrated methods on a 135M model are large (several times the perplexity), far
beyond the noise of such a sample.
"""

from __future__ import annotations

import pytest
import torch

from spp_peft.data import builtin_text, calibration_windows, token_stream
from spp_peft.evaluation import perplexity
from spp_peft.pruning import prune
from spp_peft.sparsity import nm_compliance, zero_mask, zeros_per_group

from .conftest import block_weights

pytestmark = pytest.mark.slow

SEQLEN = 256
EVAL_TOKENS = 2048


@pytest.fixture(scope="module")
def setup(smollm2, smollm2_state):
    model, tokenizer = smollm2
    calibration = calibration_windows(tokenizer, builtin_text("train"), nsamples=8, seqlen=SEQLEN, seed=0)
    heldout = token_stream(tokenizer, builtin_text("heldout"))[:EVAL_TOKENS]
    model.load_state_dict(smollm2_state)
    dense = perplexity(model, heldout, seqlen=SEQLEN, show_progress=False)
    yield model, smollm2_state, calibration, heldout, dense
    model.load_state_dict(smollm2_state)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_calibrated_methods_beat_magnitude(setup, pattern):
    model, state, calibration, heldout, dense = setup
    ppl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model.load_state_dict(state)
        result = prune(model, method, 0.5, pattern, calibration=calibration, show_progress=False)
        assert len(result.layers) == 30 * 7
        for name, w in block_weights(model).items():
            zeros = zero_mask(w)
            if pattern == "2:4":
                assert nm_compliance(zeros, 2, 4) == 1.0, name
                assert bool((zeros_per_group(zeros, 4) >= 2).all()), name
            else:
                # exact per row (magnitude, Wanda) / per layer (SparseGPT), plus any weight already 0
                assert int(zeros.sum()) >= w.numel() // 2, name
                if method != "sparsegpt":  # a dense zero scores 0, so it is among the k pruned of its row
                    assert bool((zeros.sum(dim=1) == w.shape[1] // 2).all()), name
        ppl[method] = perplexity(model, heldout, seqlen=SEQLEN, show_progress=False)
    print(f"\nSmolLM2-135M {pattern}: dense {dense:.2f} " + " ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    assert dense < ppl["wanda"] < ppl["magnitude"]
    assert dense < ppl["sparsegpt"] < ppl["magnitude"]


def test_magnitude_masks_of_the_4bit_weights_are_reproducible(setup):
    # GGUF Q4_1 weights tie massively within each 32-weight block: the stable sort must decide ties.
    model, state, *_ = setup
    masks = []
    for _ in range(2):
        model.load_state_dict(state)
        prune(model, "magnitude", 0.5, target_modules=["q_proj", "down_proj"], show_progress=False)
        masks.append({k: zero_mask(v) for k, v in block_weights(model).items()})
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    w = state["model.layers.0.mlp.down_proj.weight"]
    assert w.abs().unique().numel() < w.numel() / 10, "expected many tied magnitudes in 4-bit weights"

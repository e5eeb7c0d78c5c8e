"""Fixtures of the pruning tests: tiny real models fed real text, and the built-in SmolLM2 for slow tests."""

from __future__ import annotations

import pytest
import torch

from spp_peft.data import builtin_text, calibration_windows
from spp_peft.models import find_linears
from spp_peft.testing import byte_tokenizer, tiny_gpt2, tiny_llama
from spp_peft.sparsity import as_out_in, conv1d_class


@pytest.fixture(scope="session")
def byte_tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def calib_ids(byte_tok):
    """16 windows of 64 byte-tokens of the built-in training text (real text, not random ids)."""
    return calibration_windows(byte_tok, builtin_text("train"), nsamples=16, seqlen=64, seed=0)


# Each factory returns a fresh, identically initialised model (fixed seed).
MODEL_FACTORIES = {
    "llama": lambda: tiny_llama(),
    "llama_gqa": lambda: tiny_llama(num_heads=4, num_kv_heads=2),
    "gpt2": lambda: tiny_gpt2(),
}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_factory(request):
    return MODEL_FACTORIES[request.param]


def block_weights(model) -> dict[str, torch.Tensor]:
    """``{name: (out, in) weight copy}`` of the linear layers inside the decoder blocks."""
    conv1d = conv1d_class()
    out = {}
    for name, layer in find_linears(model).items():
        fan = conv1d is not None and isinstance(layer, conv1d)
        out[name] = as_out_in(layer.weight.detach(), fan).clone()
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    """The built-in SmolLM2-135M (loaded once; tests must restore its weights, see ``smollm2_state``)."""
    from spp_peft.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def smollm2_state(smollm2):
    return {k: v.clone() for k, v in smollm2[0].state_dict().items()}

"""Small real models for the tuner tests: a hand-written MLP with awkward shapes, a config-built tiny Llama
with grouped-query attention (k/v projections narrower than q), and a tiny GPT-2 (Conv1D layers).

Weights are pruned here by a tiny local rule (row-wise magnitude, or N:M) so the tuner tests do not depend
on the pruning package: they test the tuner, and the pruners have tests of their own.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spp_peft  # noqa: F401  (registers SPP with PEFT)
from spp_peft.sparsity import as_out_in, conv1d_class, parse_nm

PATTERNS = ["unstructured50", "2:4", "4:8", "unstructured75"]


class MLP(nn.Module):
    """Odd shapes on purpose: 16 -> 24 -> 40 -> 8 (out_features 40 and 8 are not divisible by r=3)."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 40, bias=False)
        self.lin2 = nn.Linear(40, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.lin2(self.act(self.lin1(self.act(self.lin0(x)))))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


MODEL_TARGETS = {
    "mlp": ["lin0", "lin1", "lin2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return {"mlp": lambda: MLP().eval(), "llama": lambda: tiny_llama(seed), "gpt2": lambda: tiny_gpt2(seed)}[kind]()


def prune_weight_(weight: torch.Tensor, pattern: str, fan_in_fan_out: bool = False) -> None:
    """Zero the smallest weights in place: "unstructuredXX" per output row, or N:M along the inputs."""
    w = as_out_in(weight.data, fan_in_fan_out).contiguous()
    if pattern.startswith("unstructured"):
        ratio = int(pattern[len("unstructured"):]) / 100
        k = int(w.shape[1] * ratio)
        idx = torch.argsort(w.abs(), dim=1, stable=True)[:, :k]
        w.scatter_(1, idx, 0.0)
    else:
        n, m = parse_nm(pattern)
        groups = w.view(w.shape[0], -1, m)
        idx = torch.argsort(groups.abs(), dim=-1, stable=True)[..., :n]
        groups.scatter_(-1, idx, 0.0)
    weight.data.copy_(as_out_in(w, fan_in_fan_out))


def prune_model_(model: nn.Module, kind: str, pattern: str) -> nn.Module:
    conv1d = conv1d_class()
    with torch.no_grad():
        for name, module in model.named_modules():
            if any(name == t or name.endswith("." + t) for t in MODEL_TARGETS[kind]):
                prune_weight_(module.weight, pattern, fan_in_fan_out=isinstance(module, conv1d))
    return model


def inputs_for(kind: str, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(batch, 5, 16, generator=g)}
    return {"input_ids": torch.randint(0, 96, (batch, 7), generator=g)}


def outputs(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(params=["mlp", "llama", "gpt2"])
def kind(request):
    return request.param


@pytest.fixture(params=PATTERNS)
def pattern(request):
    return request.param

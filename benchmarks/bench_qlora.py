"""QLoRA-style benchmark: one training step of SPP on a 4-bit NF4 base vs SPP on a 16-bit base vs LoRA on the
4-bit base (QLoRA), on SmolLM2-135M and on a 7B-shaped single block.

Models (both pruned 2:4 by magnitude before anything is measured, as SPP needs a sparse base):

* ``smollm2``: the built-in SmolLM2-135M (30 blocks, hidden 576);
* ``7b-block``: one Llama-7B-shaped decoder block (hidden 4096, intermediate 11008, 32 heads) with random
  weights and a 256-token vocabulary, so the block is ~all of the model.

Setups, all adapting the 7 projections of every block (SPP r=16 alpha=32, LoRA r=8 alpha=16, no dropout):

* ``spp_4bit``: the pruned model saved and loaded back with ``BitsAndBytesConfig(load_in_4bit, nf4,
  compute dtype --dtype)``, ``peft.prepare_model_for_kbit_training`` (no checkpointing), SPP;
* ``spp_16bit``: the same pruned model in ``--dtype`` (bf16 by default: native on CPUs with AVX512-BF16,
  which the table's machine line names; pass ``--dtype fp32`` where bf16 is emulated), SPP;
* ``lora_4bit``: QLoRA, LoRA on the 4-bit base prepared the same way.

All three live in one process; every round runs one AdamW step of each in a fresh random order after a
warm-up round (``common.interleaved_times``), so a busy shared machine slows all alike; times are medians
over rounds and ratios are medians of per-round ratios. Memory per setup: the peak of live torch
allocations during one step above those live before it (``common.peak_bytes``, profiler records), the peak
RSS during one step above the RSS before it (``VmHWM`` reset through ``/proc/self/clear_refs``; the
allocator may reuse freed pages, so this is a lower bound), and the bytes of the frozen base weights
(bitsandbytes' codes plus their absmax / quant-state tensors).

Usage:
    python benchmarks/bench_qlora.py                              # both models, 3 rounds, batch 1 x 128
    python benchmarks/bench_qlora.py --models 7b-block --rounds 2 --seq 64 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from common import DTYPES, interleaved_times, machine_description, md_table, median, peak_bytes, ratio_median  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETUPS = ("spp_4bit", "spp_16bit", "lora_4bit")
BLOCK_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                num_hidden_layers=1, vocab_size=256, tie_word_embeddings=True)


def _status_kib(field: str):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def rss_peak_above(fn) -> int:
    """Bytes of peak RSS during ``fn()`` above the RSS before it (0 where /proc cannot reset the peak)."""
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return 0
    fn()
    return max(0, (_status_kib("VmHWM") - before) * 1024)


def pruned_model(name: str):
    """The fp32 model pruned 2:4 by magnitude, and its description."""
    from spp_peft.pruning import prune

    if name == "smollm2":
        from spp_peft.models import load_smollm2

        model, _ = load_smollm2()
        text = "SmolLM2-135M"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**BLOCK_7B)).eval()
        text = "7B-shaped block (hidden 4096, intermediate 11008, 32 heads, vocab 256)"
    prune(model, method="magnitude", sparsity=0.5, pattern="2:4", show_progress=False)
    return model, text


def base_weight_bytes(model) -> int:
    """Bytes of every parameter, plus bitsandbytes' 4-bit quant states (absmax, nested absmax and code)."""
    total, seen = 0, set()
    for p in model.parameters():  # before the adapter is added: every parameter is the base's
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            extra = [state.absmax] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            total += sum(t.numel() * t.element_size() for t in extra)
    return total


def build(setup: str, folder: str, dtype: torch.dtype):
    """The PEFT model of one setup, from the pruned model saved in ``folder``."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import spp_peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if setup.endswith("4bit"):
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu",
                                                         dtype=torch.float32)
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        weights = base_weight_bytes(model)
        torch.manual_seed(0)
        if setup.startswith("spp"):
            config = spp_peft.SPPConfig(r=16, spp_alpha=32, spp_dropout=0.0, target_modules=TARGETS)
        else:
            config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
        model = peft.get_peft_model(model, config)
    model.train()
    return model, weights


def measure(name: str, args) -> tuple[str, list[list], dict]:
    """Build the three setups of one model, time them interleaved, measure their memory."""
    dtype = DTYPES[args.dtype]
    fp32, text = pruned_model(name)
    with tempfile.TemporaryDirectory() as folder:
        fp32.save_pretrained(folder)
        vocab = fp32.config.vocab_size
        del fp32
        models = {s: build(s, folder, dtype) for s in SETUPS}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    steps = {}
    for setup, (model, _) in models.items():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[setup] = step
    times = interleaved_times(steps, rounds=args.rounds, warmup=1)
    rows, summary = [], {}
    for setup in SETUPS:
        model, weights = models[setup]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        wall, cpu = median(times[setup]["wall"]), median(times[setup]["cpu"])
        torch_peak, rss = peak_bytes(steps[setup]), rss_peak_above(steps[setup])
        summary[setup] = dict(wall=wall, cpu=cpu, torch_peak=torch_peak or 0, rss=rss, weights=weights)
        print(f"# {name} {setup}: {summary[setup]}", flush=True)
        rows.append([setup, f"{trainable:,}", f"{weights / 2**20:.1f}", f"{wall:.2f}", f"{cpu:.2f}",
                     f"{(torch_peak or 0) / 2**20:.0f}", f"{rss / 2**20:.0f}"])
    ref = summary["spp_16bit"]
    for setup in ("spp_4bit", "lora_4bit"):
        s = summary[setup]
        rows.append([f"{setup} / spp_16bit", "", f"{s['weights'] / ref['weights']:.3f}",
                     f"{ratio_median(times, setup, 'spp_16bit', 'wall'):.2f}",
                     f"{ratio_median(times, setup, 'spp_16bit', 'cpu'):.2f}",
                     f"{s['torch_peak'] / max(ref['torch_peak'], 1):.2f}", f"{s['rss'] / max(ref['rss'], 1):.2f}"])
    s, lo = summary["spp_4bit"], summary["lora_4bit"]
    rows.append(["spp_4bit / lora_4bit", "", f"{s['weights'] / lo['weights']:.3f}",
                 f"{ratio_median(times, 'spp_4bit', 'lora_4bit', 'wall'):.2f}",
                 f"{ratio_median(times, 'spp_4bit', 'lora_4bit', 'cpu'):.2f}",
                 f"{s['torch_peak'] / max(lo['torch_peak'], 1):.2f}", f"{s['rss'] / max(lo['rss'], 1):.2f}"])
    return text, rows, summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("smollm2", "7b-block"), default=["smollm2", "7b-block"])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="the 16-bit setup's weights and the 4-bit setups' compute dtype")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_qlora: {' '.join(sys.argv)}")
    print(f"# machine: {machine_description()}")
    print(f"# batch {args.batch} x seq {args.seq}, {args.dtype} (16-bit weights / 4-bit compute), "
          f"1 warm-up + {args.rounds} interleaved rounds; SPP r=16 alpha=32, LoRA r=8 alpha=16, {','.join(TARGETS)}",
          flush=True)
    headers = ["setup", "trainable params", "base weights MiB", "step wall s", "step cpu s",
               "torch peak MiB (profiler)", "peak RSS above pre-step MiB"]
    for name in args.models:
        text, rows, _ = measure(name, args)
        print(f"\n## {text}, pruned 2:4\n")
        print(md_table(headers, rows), flush=True)
    print(f"\n# machine at end: {machine_description()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""2:4 semi-structured sparse vs dense on the GPU: linear-layer and end-to-end generation throughput.

    python benchmarks/bench_sparse24.py                      # linear shapes + SmolLM2-135M generation
    python benchmarks/bench_sparse24.py --model llama7b-2l   # Llama-7B-wide blocks (2 of them, random 2:4)
    python benchmarks/bench_sparse24.py --json out.json

Needs a CUDA GPU of compute capability >= 8.0 (see ``spp_peft.export``); anywhere else it prints a line
starting with ``SKIP`` saying what is missing and exits 0. ``--cpu-smoke`` runs the dense half of every
measurement on CPU with tiny shapes, to check the harness itself (the numbers mean nothing).

Linear layers: ``y = x W^T`` for the projections of SmolLM2-135M and Llama-7B, ``x`` of T tokens, W pruned
2:4 by magnitude; median of CUDA-event timings after warm-up. Generation: the model pruned 2:4 (random
weights for the config-built ones: speed does not depend on the values), greedy ``generate`` of N new tokens
for a batch of prompts, dense vs :func:`spp_peft.export.to_sparse24`; prefill latency and decode tokens/s.
Expect speedups only where matmuls dominate (large T: prefill, big batches); single-token decode is bound
by memory traffic and kernel launches, where 2:4 may be slower than dense.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

SHAPES = {
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "llama7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
}
TOKENS = [1, 16, 128, 1024, 4096]


def prune_24_(weight: torch.Tensor) -> torch.Tensor:
    """Zero the two smallest-magnitude weights of every 4 consecutive inputs of each row (in place)."""
    blocks = weight.abs().reshape(weight.shape[0], -1, 4)
    drop = blocks.argsort(dim=-1)[..., :2]
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, drop, True).reshape_as(weight)
    return weight.masked_fill_(mask, 0)


def prune_model_24_(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                prune_24_(module.weight)
    return model


def timed(fn, repeats: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_linear(shapes, tokens, dtype, device, repeats, warmup, sparse: bool) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for out_f, in_f in shapes:
        w = prune_24_(torch.randn(out_f, in_f, device=device, dtype=dtype))
        ws = to_sparse_semi_structured(w) if sparse else None
        for t in tokens:
            x = torch.randn(t, in_f, device=device, dtype=dtype)
            with torch.no_grad():
                dense_ms = timed(lambda: F.linear(x, w), repeats, warmup, device)
                sparse_ms = timed(lambda: F.linear(x, ws), repeats, warmup, device) if sparse else None
            flops = 2 * t * out_f * in_f
            rows.append({
                "out": out_f, "in": in_f, "tokens": t, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                "speedup": dense_ms / sparse_ms if sparse_ms else None,
                "dense_tflops": flops / dense_ms / 1e9,
            })
    return rows


def build_model(name: str, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        from spp_peft.models import load_smollm2

        model, _ = load_smollm2(dtype=torch.float32)
    elif name == "llama7b-2l":
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    elif name == "tiny":
        from spp_peft.testing import tiny_llama

        model = tiny_llama(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256)
    else:
        raise SystemExit(f"unknown model {name!r}")
    return prune_model_24_(model).to(device=device, dtype=dtype).eval()


def bench_generation(name, dtype, device, batch, prompt_len, new_tokens, repeats, warmup, sparse: bool) -> dict:
    from spp_peft.export import to_sparse24

    dense = build_model(name, dtype, device)
    vocab = dense.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), device=device, generator=torch.Generator(device).manual_seed(0))
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
               do_sample=False,
               pad_token_id=dense.config.eos_token_id if dense.config.eos_token_id is not None else 0)

    def measure(model):
        with torch.no_grad():
            prefill = timed(lambda: model(input_ids=ids), repeats, warmup, device)
            total = timed(lambda: model.generate(ids, **gen), max(1, repeats // 2), 1, device)
        decode_s = max(total - prefill, 1e-6) / 1e3
        return {"prefill_ms": prefill, "generate_ms": total, "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s}

    result = {"model": name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
              "dense": measure(dense)}
    if sparse:
        model = copy.deepcopy(dense)
        report = to_sparse24(model, dtype=dtype, device=device)
        result["converted_layers"] = len(report.converted)
        result["sparse"] = measure(model)
        with torch.no_grad():
            same = (model.generate(ids, **gen) == dense.generate(ids, **gen)).float().mean().item()
        result["greedy_token_agreement"] = same
        result["prefill_speedup"] = result["dense"]["prefill_ms"] / result["sparse"]["prefill_ms"]
        result["decode_speedup"] = result["sparse"]["decode_tokens_per_s"] / result["dense"]["decode_tokens_per_s"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--backend", default="auto", choices=("auto", "cusparselt", "cutlass"))
    parser.add_argument("--shapes", default="smollm2,llama7b", help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--model", default="smollm2", help="smollm2 | llama7b-2l | tiny | none")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--cpu-smoke", action="store_true", help="dense half only, on CPU, tiny shapes")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    from spp_peft.export import Sparse24Unsupported, check_sparse24_support

    if args.cpu_smoke:
        device, sparse, backend = torch.device("cpu"), False, "none (cpu smoke test)"
        shapes, tokens = [(64, 64), (128, 64)], [1, 16]
        model, repeats, warmup = "tiny", 2, 1
        args.batch, args.prompt_len, args.new_tokens = 2, 16, 4
    else:
        try:
            backend = check_sparse24_support(dtype=dtype, backend=args.backend)
        except Sparse24Unsupported as err:
            print(f"SKIP bench_sparse24: {err}")
            return 0
        device, sparse = torch.device("cuda"), True
        shapes = [s for key in args.shapes.split(",") if key for s in SHAPES[key]]
        tokens = [int(t) for t in args.tokens.split(",") if t]
        model, repeats, warmup = args.model, args.repeats, args.warmup
        torch.backends.cuda.matmul.allow_tf32 = False

    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": args.dtype, "backend": backend}
    print(f"# 2:4 sparse vs dense: {info}")
    linear = bench_linear(shapes, tokens, dtype, device, repeats, warmup, sparse)
    print(f"{'out x in':>13} {'tokens':>7} {'dense ms':>9} {'2:4 ms':>9} {'speedup':>8} {'dense TFLOP/s':>14}")
    for r in linear:
        sp = f"{r['sparse_ms']:9.4f}" if r["sparse_ms"] is not None else f"{'-':>9}"
        su = f"{r['speedup']:8.2f}" if r["speedup"] is not None else f"{'-':>8}"
        print(f"{r['out']:>6}x{r['in']:<6} {r['tokens']:>7} {r['dense_ms']:9.4f} {sp} {su} {r['dense_tflops']:14.1f}")
    generation = None
    if model != "none":
        generation = bench_generation(model, dtype, device, args.batch, args.prompt_len, args.new_tokens, repeats,
                                      warmup, sparse)
        print(f"# generation: {json.dumps(generation)}")
    if args.json:
        from spp_peft._utils import atomic_write_file

        atomic_write_file(args.json, json.dumps({"info": info, "linear": linear, "generation": generation}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

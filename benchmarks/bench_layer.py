"""Layer benchmark: forward + backward of one adapted linear layer, SPP against the alternatives.

Alternatives, all on the same frozen (50% pruned) weight, input ``x`` (tokens x in, requiring grad, as
inside a model) and output gradient:

* ``spp``            the SPP layer of this package (PEFT tuner layer -> ``spp_peft.kernel``), r=16, s=2;
* ``spp_dropout``    the same with ``spp_dropout=0.1`` in train mode (the exact two-branch dropout path);
* ``lora_r8``        PEFT's LoRA layer, r=8, alpha=16 (its own fast path, no dropout);
* ``frozen``         the frozen base alone, gradient w.r.t. the input only (the floor: 2 matmuls);
* ``full_ft``        full fine-tuning of the weight (3 matmuls, the weight-sized gradient);
* ``ref_group_loop`` the reference formulation that loops over the 16 row groups (``DiagonalLinear``
                     style): ``y = x W^T + cat_g[(x * A_g) W_g^T * s B_g]`` (4 weight-sized matmuls);
* ``ref_checkpoint`` the reference implementation's formulation (its ``DiagonalLinear``): the base
                     ``x W^T`` plus, under reentrant activation checkpointing, the adapter branch
                     ``x ((repeat_interleave(A) * B) * W)^T * s`` materialised from the factors
                     (6 weight-sized matmuls per step: 2 forward, 1 recomputed, 3 backward);
* ``autograd_mat``   plain autograd through the materialised formula (keeps ``D``, ``W*D``, ``W'``).

Reported per shape and method: median wall and CPU time per forward+backward, their ratios to LoRA, full
fine-tuning and SPP measured in the same rounds, the bytes autograd saves for backward (total, and extra
beyond the input and the parameters), and the peak of live torch allocations during the step (see
``benchmarks/common.py`` for how each is measured).

Usage:
    python benchmarks/bench_layer.py                      # CPU fp32, the 3 LLaMA-like shapes
    python benchmarks/bench_layer.py --dtype bf16 --tokens 128 --rounds 2   # CPU bf16 (emulated: slow)
    python benchmarks/bench_layer.py --threads 1 --rounds 9
    python benchmarks/bench_layer.py --chunks 128,256,512 # SPP time and peak vs kernel row chunking
    python benchmarks/bench_layer.py --shapes 7b --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from common import (  # noqa: E402
    DTYPES,
    interleaved_times,
    machine_description,
    md_table,
    median,
    mib,
    peak_bytes,
    ratio_median,
    require_device,
    saved_bytes,
)

SHAPES = {
    # (in, out) of LLaMA-like projections at 1/4 scale: attention, MLP up/gate, MLP down.
    "llama": ([(1024, 1024), (1024, 2816), (2816, 1024)], 1024),
    # LLaMA-7B: q/k/v/o, gate/up, down.
    "7b": ([(4096, 4096), (4096, 11008), (11008, 4096)], 4096),
}
R, ALPHA = 16, 32.0
LORA_R = 8


class _Wrap(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear


def _peft_layer(kind: str, weight: torch.Tensor, dropout: float = 0.0) -> nn.Module:
    """The PEFT-injected layer (SPP or LoRA) on a bias-free linear holding ``weight``."""
    import peft

    import spp_peft  # noqa: F401  (registers SPP)

    m, n = weight.shape
    linear = nn.Linear(n, m, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    if kind == "spp":
        config = spp_peft.SPPConfig(r=R, spp_alpha=ALPHA, spp_dropout=dropout, target_modules=["proj"],
                                    init_weights=False, sparsity_check="off")
    else:
        config = peft.LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=dropout, target_modules=["proj"],
                                 init_lora_weights=False)
    model = peft.get_peft_model(_Wrap(linear), config)
    layer = model.base_model.model.proj
    layer.to(device=weight.device, dtype=weight.dtype)
    layer.train()
    return layer


def _materialised(x, W, A, B, scale, groups):
    """``F.linear(x, W * (1 + s * B[j] * A[g(j)]))`` with plain autograd ops."""
    D = (B * scale).unsqueeze(1) * A.index_select(0, groups)
    return F.linear(x, W * (1 + D))


def _checkpointed_branch(x, A, B, W, r):
    """The reference's adapter branch: ``F.linear(x, (repeat_interleave(A, m // r) * B[:, None]) * W)``."""
    return F.linear(x, (torch.repeat_interleave(A, W.shape[0] // r, dim=0) * B.unsqueeze(1)) * W)


def _group_loop(x, W, A, B, scale, r):
    """The reference group loop: per group a matmul on the input scaled by ``A_g``, rows scaled by ``B_g``."""
    m = W.shape[0]
    size = m // r
    y = F.linear(x, W)
    parts = [F.linear(x * A[g], W[g * size:(g + 1) * size]) * (B[g * size:(g + 1) * size] * scale)
             for g in range(r)]
    return y + torch.cat(parts, dim=-1)


def build_methods(n: int, m: int, tokens: int, dtype: torch.dtype, device: torch.device, chunks=()):
    """``(methods, tensors)``: ``methods[name] = (forward, params)`` where ``forward()`` returns ``y``."""
    from spp_peft.kernel import group_index

    g = torch.Generator(device="cpu").manual_seed(0)
    W = torch.randn(m, n, generator=g) / n**0.5
    W[torch.rand(m, n, generator=g) < 0.5] = 0  # 50% unstructured sparsity (dense kernels don't care)
    W = W.to(device=device, dtype=dtype)
    x = torch.randn(tokens, n, generator=g).to(device=device, dtype=dtype).requires_grad_()
    gy = torch.randn(tokens, m, generator=g).to(device=device, dtype=dtype)

    spp = _peft_layer("spp", W)
    spp_do = _peft_layer("spp", W, dropout=0.1)
    lora = _peft_layer("lora", W)
    A = spp.spp_A["default"]
    B = spp.spp_B["default"]
    scale = spp.scaling["default"]
    groups = group_index(m, R, device)
    W_full = W.clone().requires_grad_()

    methods = {
        "spp": (lambda: spp(x), [A, B]),
        "spp_dropout": (lambda: spp_do(x), list(spp_do.parameters())),
        "lora_r8": (lambda: lora(x), list(lora.parameters())),
        "frozen": (lambda: F.linear(x, W), []),
        "full_ft": (lambda: F.linear(x, W_full), [W_full]),
        "ref_group_loop": (lambda: _group_loop(x, W, A, B, scale, R), [A, B]),
        "ref_checkpoint": (
            lambda: F.linear(x, W) + checkpoint(partial(_checkpointed_branch, W=W, r=R), x, A, B,
                                                use_reentrant=True) * scale,
            [A, B],
        ),
        "autograd_mat": (lambda: _materialised(x, W, A, B, scale, groups), [A, B]),
    }
    frozen = [W, spp.get_base_layer().weight, lora.get_base_layer().weight, spp_do.get_base_layer().weight]
    for c in chunks:
        layer = _peft_layer("spp", W)
        layer.chunk_rows = c
        methods[f"spp_chunk{c}"] = (partial(layer, x), [layer.spp_A["default"], layer.spp_B["default"]])
        frozen.append(layer.get_base_layer().weight)
    params = [p for _, ps in methods.values() for p in ps] + [x, W_full]
    return methods, x, gy, params, frozen


def run_shape(n, m, tokens, dtype, device, rounds, warmup, chunks, only=None):
    methods, x, gy, params, frozen = build_methods(n, m, tokens, dtype, device, chunks)
    if only:
        methods = {k: v for k, v in methods.items() if k in only or k.startswith("spp_chunk")}

    def clear():
        for p in params:
            p.grad = None

    def step(fwd):
        fwd().backward(gy)

    times = interleaved_times({k: partial(step, f) for k, (f, _) in methods.items()}, rounds, warmup, device,
                              after_each=clear)
    rows = {}
    for k, (fwd, ps) in methods.items():
        total, extra = saved_bytes(fwd, existing=[x, *ps, *frozen])
        clear()
        peak = peak_bytes(partial(step, fwd), device)
        clear()
        rows[k] = dict(wall=median(times[k]["wall"]), cpu=median(times[k]["cpu"]), saved=total, extra=extra,
                       peak=peak)
    return times, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="llama")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default: 1024, 4096 for 7b)")
    p.add_argument("--dtype", default=None,
                   help="comma list of fp32, bf16, fp16 (default: fp32 on CPU, where bf16 matmuls are emulated "
                        "and ~50x slower without bf16 instructions, see README; bf16 on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs every method once)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--chunks", default="", help="comma list of SPP chunk_rows values to add as methods")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None,
                   help="clock of the ratios (default: cpu time with 1 thread on CPU, else wall time)")
    p.add_argument("--only", default="", help="comma list of methods to run (default: all)")
    args = p.parse_args(argv)

    device = require_device(args.device)
    args.dtype = args.dtype or ("fp32" if device.type == "cpu" else "bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, default_tokens = SHAPES[args.shapes]
    tokens = args.tokens or default_tokens
    chunks = [int(c) for c in args.chunks.split(",") if c]
    only = [s for s in args.only.split(",") if s] or None
    # CPU time is robust to other processes on the machine but sums all threads (and OpenMP spin-waits):
    # use it for one thread on CPU, wall time otherwise (or as asked).
    clock = args.clock or ("cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    print(f"# bench_layer: {' '.join(sys.argv)}")
    print(f"# machine: {machine_description(args.device)}")
    print(f"# {tokens} tokens, SPP r={R} alpha={ALPHA}, LoRA r={LORA_R}; medians over {args.rounds} interleaved "
          f"rounds after {args.warmup} warm-up; ratios are medians of per-round ratios of {clock} time")
    ok, checked = True, False
    for dname in args.dtype.split(","):
        dtype = DTYPES[dname]
        table = []
        for n, m in shapes:
            times, rows = run_shape(n, m, tokens, dtype, device, args.rounds, args.warmup, chunks, only)

            def rat(a, b):
                return ratio_median(times, a, b, clock) if a in times and b in times else float("nan")

            def rmin(a, b):  # ratio of the fastest rounds: the least disturbed estimate on a busy machine
                if a not in times or b not in times:
                    return float("nan")
                return min(times[a][clock]) / min(times[b][clock])

            for k, row in rows.items():
                table.append([f"{n}->{m}", k, f"{row['wall'] * 1e3:.1f}", f"{row['cpu'] * 1e3:.1f}",
                              f"{min(times[k][clock]) * 1e3:.1f}",
                              f"{rat(k, 'lora_r8'):.2f}", f"{rat(k, 'full_ft'):.2f}", f"{rat(k, 'spp'):.2f}",
                              f"{rmin(k, 'lora_r8'):.2f}", f"{rmin(k, 'full_ft'):.2f}",
                              mib(row["saved"]), mib(row["extra"]), mib(row["peak"])])
            if "spp" in rows and (only is None):
                peak_ratio = (rows["spp"]["peak"] or 0) / max(rows["lora_r8"]["peak"] or 1, 1)
                checks = {
                    "spp <= 1.1x full_ft": rat("spp", "full_ft") <= 1.1,
                    "spp <= 1.5x lora": rat("spp", "lora_r8") <= 1.5,
                    "group loop >= 1.5x spp": rat("ref_group_loop", "spp") >= 1.5,
                    "checkpoint >= 1.5x spp": rat("ref_checkpoint", "spp") >= 1.5,
                    "spp saves nothing extra": rows["spp"]["extra"] == 0,
                    f"spp peak <= lora peak (ratio {peak_ratio:.4f})": peak_ratio <= 1.0,
                }
                if dname == "fp32" and device.type == "cpu":
                    ok &= all(checks.values())
                    checked = True
                print(f"# {dname} {n}->{m} targets (median ratios): " + ", ".join(
                    f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()), flush=True)
        print()
        print(f"## {dname}, {device.type}, {tokens} tokens")
        print(md_table(["shape (in->out)", "method", "wall ms", "cpu ms", f"min {clock} ms", "/ lora_r8",
                        "/ full_ft", "/ spp", "min / min lora_r8", "min / min full_ft", "saved MiB",
                        "extra saved MiB", "peak MiB"], table))
        print(flush=True)
    print(f"# machine at end: {machine_description(args.device)}")
    print(f"# CPU fp32 targets all met: {ok if checked else 'n/a (no full CPU fp32 run)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

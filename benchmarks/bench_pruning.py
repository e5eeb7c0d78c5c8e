"""Pruning time of magnitude, Wanda and SparseGPT on the built-in SmolLM2-135M (CPU by default).

Usage:
    python benchmarks/bench_pruning.py                       # 32 x 256 calibration tokens, 50% and 2:4
    python benchmarks/bench_pruning.py --eval-tokens 8192    # also held-out perplexity of each result
    python benchmarks/bench_pruning.py --device cuda --json out.json

Each (method, pattern) prunes a fresh copy of the dense weights once; the table gives the wall time
(``PruningResult.seconds``: calibration capture, statistics, pruning and output recomputation included)
and the process CPU time. On a shared machine the CPU time divided by the number of intra-op threads is the
better estimate of the time on an idle one; the machine line records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from common import machine_description, md_table  # noqa: E402
from spp_peft._utils import atomic_write_file  # noqa: E402
from spp_peft.data import builtin_text, calibration_windows, token_stream  # noqa: E402
from spp_peft.evaluation import perplexity  # noqa: E402
from spp_peft.models import load_smollm2  # noqa: E402
from spp_peft.pruning import prune  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens for perplexity (0: skip)")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2()
    model.to(args.device)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = calibration_windows(tokenizer, builtin_text("train"), args.nsamples, args.seqlen, args.seed)
    heldout = token_stream(tokenizer, builtin_text("heldout"))[: args.eval_tokens] if args.eval_tokens else None

    rows, results = [], []
    if heldout is not None:
        ppl = perplexity(model, heldout, seqlen=args.seqlen, show_progress=False)
        rows.append(["dense", "-", "-", "-", "-", f"{ppl:.2f}"])
        results.append({"method": "dense", "perplexity": ppl})
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            model.load_state_dict(dense)
            cpu0 = time.process_time()
            result = prune(
                model,
                method,
                args.sparsity,
                pattern,
                calibration=calibration,
                device=args.device,
                show_progress=False,
            )
            cpu = time.process_time() - cpu0
            entry = {
                "method": method,
                "pattern": pattern if pattern != "unstructured" else f"{args.sparsity:.0%}",
                "wall_s": result.seconds,
                "cpu_s": cpu,
                "sparsity": result.report.total_sparsity,
                "layers": len(result.layers),
            }
            if heldout is not None:
                entry["perplexity"] = perplexity(model, heldout, seqlen=args.seqlen, show_progress=False)
            results.append(entry)
            rows.append(
                [
                    method,
                    entry["pattern"],
                    f"{entry['wall_s']:.1f}",
                    f"{entry['cpu_s']:.1f}",
                    f"{entry['sparsity']:.2%}",
                    f"{entry['perplexity']:.2f}" if "perplexity" in entry else "-",
                ]
            )
            # Partial results as they come: a run on a busy machine may be stopped before the table.
            print(f"done: {json.dumps(entry)}", file=sys.stderr, flush=True)

    machine = machine_description(args.device)
    print(f"SmolLM2-135M-Instruct, calibration {args.nsamples} x {args.seqlen} "
          f"tokens (built-in text, seed {args.seed}), device {args.device}")
    print(machine)
    print()
    print(md_table(["method", "pattern", "wall s", "CPU s", "sparsity (blocks)", "held-out ppl"], rows))
    out = {"machine": machine, "args": vars(args), "results": results}
    if args.json:
        atomic_write_file(args.json, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

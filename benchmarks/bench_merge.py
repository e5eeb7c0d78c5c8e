"""Merge benchmark: ``merge_and_unload()`` time, SPP vs LoRA, on SmolLM2-135M (7 projections x 30 layers).

The model is loaded once (``spp_peft.models.load_smollm2``); every repetition deep-copies it, injects the
adapter with non-trivial factors (SPP ``init_weights=False``: random ``spp_B``; LoRA
``init_lora_weights=False``: random ``lora_B``) and times ``merge_and_unload()`` alone. Methods alternate
order between repetitions. SPP is timed with its default zero-set check (``sparsity_check="strict"``:
the merged weight's zero set is compared with the base's, the package's guarantee), with the check off,
and with the strict check forced to the full element-wise comparison instead of the default count-based
check (patched into ``spp_peft.tuner.layer`` for that method only). CPU time (``time.process_time``) and wall time; medians over
repetitions.

Usage:
    python benchmarks/bench_merge.py --reps 5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def elementwise_zero_set_change(weight_before, weight_after, zeros_cannot_fill=False, zeros_before=None):
    """The zero-set check without the proof-based shortcut: always the full element-wise comparison
    (what ``zero_set_change`` falls back to). Measured as ``spp_elementwise_check``."""
    from spp_peft.sparsity import compare_zero_sets, zero_mask

    return compare_zero_sets(zero_mask(weight_before.detach()), weight_after)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)

    import torch

    import peft
    import spp_peft
    from common import machine_description, md_table, median
    from spp_peft.models import load_smollm2
    from spp_peft.tuner import layer as layer_module

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_merge: {' '.join(sys.argv)}")
    print(f"# machine: {machine_description()}", flush=True)
    base, _ = load_smollm2()

    configs = {
        "spp": lambda: spp_peft.SPPConfig(r=16, spp_alpha=32, target_modules=TARGETS, init_weights=False),
        "spp_check_off": lambda: spp_peft.SPPConfig(r=16, spp_alpha=32, target_modules=TARGETS,
                                                    init_weights=False, sparsity_check="off"),
        "spp_elementwise_check": lambda: spp_peft.SPPConfig(r=16, spp_alpha=32, target_modules=TARGETS,
                                                            init_weights=False),
        "lora_r8": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
    }
    times = {k: {"wall": [], "cpu": []} for k in configs}
    names = list(configs)
    n_layers = None
    for rep in range(args.reps + 1):  # the first repetition is a warm-up
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            torch.manual_seed(rep)
            model = peft.get_peft_model(copy.deepcopy(base), configs[name]())
            n_layers = sum(1 for mod in model.modules() if isinstance(mod, peft.tuners.tuners_utils.BaseTunerLayer))
            original = layer_module.zero_set_change
            if name == "spp_elementwise_check":
                layer_module.zero_set_change = elementwise_zero_set_change
            try:
                c0, t0 = time.process_time(), time.perf_counter()
                merged = model.merge_and_unload()
                t1, c1 = time.perf_counter(), time.process_time()
            finally:
                layer_module.zero_set_change = original
            if rep:
                times[name]["wall"].append(t1 - t0)
                times[name]["cpu"].append(c1 - c0)
            del model, merged

    rows = []
    ref = times["lora_r8"]
    for name in names:
        t = times[name]
        rows.append([name, n_layers, f"{median(t['wall']) * 1e3:.0f}", f"{median(t['cpu']) * 1e3:.0f}",
                     f"{median(t['cpu']) / n_layers * 1e3:.2f}",
                     f"{median([a / b for a, b in zip(t['wall'], ref['wall'])]):.2f}",
                     f"{median([a / b for a, b in zip(t['cpu'], ref['cpu'])]):.2f}"])
    print()
    print(md_table(["method", "adapted layers", "merge_and_unload wall ms", "cpu ms", "cpu ms / layer",
                    "/ lora (wall)", "/ lora (cpu)"], rows))
    print()
    print(f"# machine at end: {machine_description()}")
    spp_ratio = median([a / b for a, b in zip(times["spp"]["cpu"], ref["cpu"])])
    print(f"# target merge_and_unload <= LoRA's: {'yes' if spp_ratio <= 1.0 else 'NO'} (cpu ratio {spp_ratio:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

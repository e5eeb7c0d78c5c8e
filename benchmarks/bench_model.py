"""Whole-model benchmark: one training step (forward, backward, AdamW step) on SmolLM2-135M, SPP vs LoRA.

Both methods adapt the same 7 projections of every decoder layer (q, k, v, o, gate, up, down): SPP with
r=16, alpha=32 (the paper's setting), LoRA with r=8, alpha=16, no dropout for either; a random batch of
``--batch x --seq`` tokens (default 4 x 256) with next-token labels; fp32 on CPU.

Every measurement runs in a fresh subprocess (one per method and repetition, in an alternating order:
SPP, LoRA, LoRA, SPP, ...) so that the peaks of one method never mix with the other's and the allocator
starts clean. In each subprocess: load the cached model (``spp_peft.models.load_smollm2``), inject the
adapter, ``--warmup`` untimed steps, then ``--steps`` timed steps, then one step under the profiler.

Reported per method (medians over all timed steps of all repetitions):

* wall and CPU time per step (CPU time = ``time.process_time``, all threads);
* peak RSS during the timed steps, above the RSS before them: Linux's ``VmHWM`` is reset by writing ``5``
  to ``/proc/self/clear_refs`` after warm-up, so it measures the steps, not the model load;
* peak of live torch allocations during one step, above the live tensors before it (``torch.profiler``
  allocation records; see ``benchmarks/common.py``): the precise, allocator-independent figure.

Usage:
    python benchmarks/bench_model.py                       # 3 repetitions x (1 warm-up + 2 steps)
    python benchmarks/bench_model.py --reps 2 --steps 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    """One subprocess: one method, warm-up, timed steps, one profiled step; returns a JSON-able dict."""
    import torch

    import peft
    import spp_peft
    from common import peak_bytes
    from spp_peft.models import load_smollm2

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, _ = load_smollm2()
    load_s = time.perf_counter() - t0
    if args.method == "spp":
        config = spp_peft.SPPConfig(r=16, spp_alpha=32, spp_dropout=0.0, target_modules=TARGETS)
    else:
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)

    def step():
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    rss_before = _status_kib("VmRSS")
    hwm_reset = _reset_peak_rss()
    wall, cpu = [], []
    for _ in range(args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    hwm = _status_kib("VmHWM")
    torch_peak = peak_bytes(step)
    return dict(
        method=args.method,
        wall=wall,
        cpu=cpu,
        load_s=load_s,
        trainable_params=sum(p.numel() for p in trainable),
        rss_before_kib=rss_before,
        peak_rss_kib=hwm,
        peak_rss_above_kib=(hwm - rss_before) if (hwm is not None and rss_before is not None and hwm_reset) else None,
        torch_peak_bytes=torch_peak,
        threads=torch.get_num_threads(),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="subprocesses per method (alternating order)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps per subprocess")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--worker", choices=["spp", "lora"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.method = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    import torch

    from common import machine_description, md_table, median

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_model: {' '.join(sys.argv)}")
    print(f"# machine: {machine_description()}")
    print(f"# SmolLM2-135M fp32, batch {args.batch} x seq {args.seq}, SPP r=16 alpha=32 vs LoRA r=8 alpha=16 on "
          f"{','.join(TARGETS)}; AdamW; {args.reps} subprocesses per method x ({args.warmup} warm-up + "
          f"{args.steps} timed steps)", flush=True)
    results: dict[str, list[dict]] = {"spp": [], "lora": []}
    for rep in range(args.reps):
        order = ["spp", "lora"] if rep % 2 == 0 else ["lora", "spp"]
        for method in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"worker {method} failed (exit {proc.returncode})")
            res = json.loads(line[len("RESULT "):])
            results[method].append(res)
            print(f"# rep {rep} {method}: wall {['%.2f' % t for t in res['wall']]} s, cpu "
                  f"{['%.2f' % t for t in res['cpu']]} s, peak RSS above start "
                  f"{(res['peak_rss_above_kib'] or 0) / 1024:.0f} MiB, torch peak "
                  f"{(res['torch_peak_bytes'] or 0) / 2**20:.0f} MiB", flush=True)

    def agg(method, key):
        return [v for r in results[method] for v in r[key]]

    rows, summary = [], {}
    for method in ("spp", "lora"):
        wall, cpu = median(agg(method, "wall")), median(agg(method, "cpu"))
        rss = median([r["peak_rss_above_kib"] for r in results[method] if r["peak_rss_above_kib"] is not None] or [0])
        hwm = median([r["peak_rss_kib"] for r in results[method]])
        tpk = median([r["torch_peak_bytes"] or 0 for r in results[method]])
        summary[method] = dict(wall=wall, cpu=cpu, rss=rss, hwm=hwm, tpk=tpk)
        rows.append([method, results[method][0]["trainable_params"], f"{wall:.2f}", f"{cpu:.2f}",
                     f"{hwm / 1024:.0f}", f"{rss / 1024:.0f}", f"{tpk / 2**20:.0f}"])
    s, lo = summary["spp"], summary["lora"]
    rows.append(["spp / lora", "", f"{s['wall'] / lo['wall']:.2f}", f"{s['cpu'] / lo['cpu']:.2f}",
                 f"{s['hwm'] / lo['hwm']:.3f}", f"{s['rss'] / max(lo['rss'], 1):.3f}", f"{s['tpk'] / lo['tpk']:.3f}"])
    print()
    print(md_table(["method", "trainable params", "step wall s", "step cpu s", "peak RSS MiB (VmHWM)",
                    "peak RSS above pre-step MiB", "torch peak MiB (profiler)"], rows))
    print()
    print(f"# machine at end: {machine_description()}")
    print(f"# targets: step time <= 1.2x LoRA: {'yes' if s['wall'] / lo['wall'] <= 1.2 else 'NO'} (wall), "
          f"{'yes' if s['cpu'] / lo['cpu'] <= 1.2 else 'NO'} (cpu); peak memory <= LoRA: "
          f"{'yes' if s['tpk'] <= lo['tpk'] else 'NO'} (torch), {'yes' if s['hwm'] <= lo['hwm'] else 'NO'} (RSS)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

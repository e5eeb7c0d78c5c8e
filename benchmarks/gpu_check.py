"""Every GPU test and GPU benchmark in one call, one table: ``make gpu-check`` (or ``python benchmarks/gpu_check.py``).

A GPU is lent to this project only now and then, for minutes; this script is the one prepared run that uses
it. Steps (each with its own time limit, ~8 minutes in all on an H100/H200):

1. ``pytest -m gpu``: the GPU tests (2:4 export correctness, CUDA dtypes);
2. ``bench_layer.py --device cuda --shapes 7b``: SPP vs LoRA vs full fine-tuning, one layer, bf16, LLaMA-7B shapes;
3. ``bench_sparse24.py``: 2:4 semi-structured vs dense on LLaMA-7B shapes and a 2-block LLaMA-7B-wide model;
4. ``nccl_smoke.py`` under torchrun: SPP steps under DDP over NCCL, one process per GPU.

Without CUDA it prints ``SKIP gpu-check: ...`` and exits 0, so CI (which never has a GPU) can call it.
Use a Python whose torch has CUDA: ``make gpu-check PYTHON_GPU=python3``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def steps(gpus: int) -> list[tuple[str, list[str], int]]:
    py = sys.executable
    return [
        ("pytest -m gpu", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], 150),
        ("layer bf16 7B", [py, "benchmarks/bench_layer.py", "--device", "cuda", "--shapes", "7b", "--rounds", "5"],
         150),
        ("2:4 export speed", [py, "benchmarks/bench_sparse24.py", "--shapes", "llama7b", "--tokens", "128,1024,4096",
                              "--model", "llama7b-2l", "--repeats", "10"], 150),
        ("NCCL DDP smoke", [py, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}",
                            "benchmarks/nccl_smoke.py"], 90),
    ]


def summary(name: str, out: str) -> str:
    """The figure of each step worth a row in the table."""
    if name.startswith("pytest"):
        found = re.findall(r"(\d+ (?:passed|failed|skipped|errors?))", out)
        return ", ".join(found[-3:]) or "no result line"
    if name.startswith("layer"):
        rows = [line for line in out.splitlines() if "| spp |" in line]
        ratios = [line.split("|")[6].strip() for line in rows]  # the "/ lora_r8" column
        return "SPP / LoRA r8 per shape: " + ", ".join(ratios) if ratios else "no table"
    if name.startswith("2:4"):
        speed = re.findall(r"^\s*\d+x\d+\s+(\d+)\s+\S+\s+\S+\s+([\d.]+)", out, re.M)
        best = max(speed, key=lambda t: float(t[1]), default=None)
        return f"best linear speedup {best[1]}x at {best[0]} tokens" if best else out.strip().splitlines()[-1][:80]
    line = [x for x in out.splitlines() if x.startswith("NCCL OK")]
    return line[0] if line else "no NCCL OK line"


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"SKIP gpu-check: torch {torch.__version__} sees no CUDA device (CI never has one)")
        return 0
    gpus = torch.cuda.device_count()
    print(f"# gpu-check on {torch.cuda.get_device_name()} x{gpus}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    table, failed = [], 0
    for name, command, limit in steps(gpus):
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            status, out = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            status, out = f"timeout {limit}s", (err.stdout or b"").decode(errors="replace") if isinstance(
                err.stdout, bytes) else (err.stdout or "")
        failed += status != "ok"
        print(f"\n## {name}: {status}\n{out[-6000:]}", flush=True)
        table.append((name, status, f"{time.perf_counter() - start:.0f}", summary(name, out)))
    print("\n| step | status | seconds | result |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

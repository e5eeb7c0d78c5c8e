"""Shared helpers of the benchmarks: machine description, interleaved timing, memory measures, tables.

Timing. Every alternative runs once per *round*, in a fresh random order each round, all in one process,
after warm-up rounds; we report the median over rounds of each alternative's time and the median of the
per-round *ratios* to a reference, so slow phases of a shared machine hit all alternatives alike. Two
clocks are recorded: wall time (``time.perf_counter``; on CUDA after ``synchronize``) and CPU time of the
process (``time.process_time``). With one intra-op thread the CPU time is the time the work itself took
and is insensitive to other processes taking the cores, so it is the robust figure on a busy machine.

Memory. ``saved_bytes`` counts, with ``torch.autograd.graph.saved_tensors_hooks``, the distinct storages
autograd keeps for backward, and how many bytes of them are *extra*: not the input and not a parameter
(which exist anyway). ``peak_bytes`` is the peak of live torch allocations during a call above what was
live before it: on CPU read from the allocation records of ``torch.profiler`` (``profile_memory=True``;
every CPU tensor allocation and free goes through c10's allocator, which reports to the profiler); on CUDA
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str = "cpu") -> str:
    """One line: CPU model, cores, torch version and threads, BLAS backends, load (and the GPU on CUDA)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count()
    parts = [
        f"CPU: {cpu_model()}",
        f"{os.cpu_count()} logical cores ({affinity} usable)",
        f"torch {torch.__version__}",
        f"intra-op threads {torch.get_num_threads()}",
        f"MKL {torch.backends.mkl.is_available()}",
        f"oneDNN {torch.backends.mkldnn.is_available()}",
        f"python {platform.python_version()}",
    ]
    try:
        parts.append("load avg %.2f %.2f %.2f" % os.getloadavg())
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    return "; ".join(parts)


def require_device(device: str) -> torch.device:
    """The device, or a clear exit when CUDA is asked for but absent."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} asked for, but torch {torch.__version__} sees no CUDA device here; "
                         "run on a GPU machine or use --device cpu")
    return torch.device(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int = 1,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    after_each: Optional[Callable[[], None]] = None,
) -> dict[str, dict[str, list[float]]]:
    """Run every function once per round in a shuffled order; ``{name: {"wall": [...], "cpu": [...]}}`` in s.

    ``after_each`` (untimed) runs after every call, e.g. to drop gradients."""
    rng = random.Random(seed)
    names = list(fns)
    out = {k: {"wall": [], "cpu": []} for k in names}
    for rnd in range(warmup + rounds):
        order = names[:]
        rng.shuffle(order)
        for k in order:
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fns[k]()
            sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            if after_each is not None:
                after_each()
            if rnd >= warmup:
                out[k]["wall"].append(t1 - t0)
                out[k]["cpu"].append(c1 - c0)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def ratio_median(times: dict, name: str, ref: str, clock: str) -> float:
    """Median over rounds of ``time[name] / time[ref]`` (both measured in the same round)."""
    return statistics.median(a / b for a, b in zip(times[name][clock], times[ref][clock]))


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        s = t.untyped_storage()
        return (t.device.type, s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):
        return (t.device.type, id(t), t.numel() * t.element_size())


def saved_bytes(forward: Callable[[], torch.Tensor], existing: Iterable[torch.Tensor] = ()) -> tuple[int, int]:
    """``(total, extra)`` bytes of the distinct storages saved for backward by ``forward()``.

    ``extra`` leaves out the storages of ``existing`` (the input, parameters, frozen weights: tensors that
    live anyway), so it is the memory a method *adds* until backward runs."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        seen[key] = key[2]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    known = {_storage_key(t) for t in existing}
    total = sum(seen.values())
    extra = sum(v for k, v in seen.items() if k not in known)
    return total, extra


def peak_bytes(fn: Callable[[], None], device: torch.device = torch.device("cpu")) -> Optional[int]:
    """Peak of live torch allocations during ``fn()`` above those live before it (see module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - private API moved
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocations = []
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            allocations.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

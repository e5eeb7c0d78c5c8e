"""The answer of an estimate, :class:`MemoryEstimate`, and its plain-text table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Union

__all__ = ["GIB", "MemoryEstimate", "format_estimate"]

GIB = 1024**3

# Rows of the table in this order (the model's weights first, the step's temporaries last); a component
# not listed here follows them.
_ORDER = ("weights", "fp32 master weights", "trainable parameters", "DDP gradient buckets", "optimizer states",
          "gathered parameters", "runtime overhead", "gradients", "activations", "loss (logits)",
          "SPP kernel temporaries", "dequantized weight", "autocast weight copies", "optimizer temporaries")


@dataclass
class MemoryEstimate:
    """Per-device peak memory of one training step, in bytes (see :mod:`spp_peft.estimate.components`).

    ``components`` maps a readable name to the bytes alive at the peak; ``total`` is their sum. The peak is
    the larger of two moments, both broken down in ``phase_components``: the start of backward (every saved
    activation and the loss gradients alive) and the optimizer step (every gradient alive); ``peak_phase``
    names it. ``settings`` records the inputs (JSON-ready).
    """

    method: str
    settings: dict
    total_params: int
    trainable_params: int
    components: dict[str, int]
    peak_phase: str = "start of backward"
    phase_components: dict[str, dict[str, int]] = field(default_factory=dict)

    def phase_total(self, phase: str) -> int:
        return int(sum(self.phase_components[phase].values()))

    @property
    def total(self) -> int:
        return int(sum(self.components.values()))

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def to_dict(self) -> dict:
        data = asdict(self)
        data["total"] = self.total
        return data


def _fmt_bytes(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n else "0"


def _weights_text(s: dict) -> str:
    """The stored weights' format: the dtype, or the quantized blocks (the rest in the dtype)."""
    kind = s.get("quantization", "none")
    if kind in (None, "none"):
        return s["dtype"]
    return f"{kind}{' double-quant' if s.get('double_quant') else ''} block linears (rest {s['dtype']})"


def format_estimate(estimates: Union[MemoryEstimate, Iterable[MemoryEstimate]]) -> str:
    """A plain-text table: one column per estimate, one row per memory component, then the total."""
    rows = [estimates] if isinstance(estimates, MemoryEstimate) else list(estimates)
    if not rows:
        return ""
    s = rows[0].settings
    head = (
        f"Per-device memory estimate: {s['model']}, batch {s['batch_size']} x seq {s['seq_len']}, "
        f"weights {_weights_text(s)}, compute {s['compute_dtype']}, {s['devices']} device(s), sharding {s['sharding']}, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, optimizer {s['optimizer']}"
    )
    names = [n for n in _ORDER if any(n in e.components for e in rows)]
    for e in rows:
        names += [k for k in e.components if k not in names]
    labels = [e.method.upper() if e.method != "full" else "full FT" for e in rows]
    width = max(len(n) for n in names + ["trainable params", "total (peak)"])
    col = max(12, *(len(x) for x in labels))
    lines = [head, "", f"{'':<{width}}  " + "  ".join(f"{x:>{col}}" for x in labels)]
    lines.append(f"{'trainable params':<{width}}  " + "  ".join(f"{e.trainable_params:>{col},}" for e in rows))
    for n in names:
        lines.append(f"{n:<{width}}  " + "  ".join(f"{_fmt_bytes(e.components.get(n, 0)):>{col}}" for e in rows))
    lines.append(f"{'total (peak)':<{width}}  " + "  ".join(f"{_fmt_bytes(e.total):>{col}}" for e in rows))
    lines.append(f"{'peak at':<{width}}  " + "  ".join(
        f"{('backward' if e.peak_phase == 'start of backward' else 'optim step'):>{col}}" for e in rows))
    lines.append("")
    lines.append("Add the runtime's own overhead (CUDA context, workspaces, fragmentation: ~1-2 GiB per GPU) "
                 "unless --overhead-gib includes it. Model and validation: docs/scaling.md.")
    return "\n".join(lines)

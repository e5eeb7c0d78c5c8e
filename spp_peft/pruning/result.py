"""What a pruning run did: per-layer records, the model's sparsity report and the metadata it leaves behind."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from spp_peft import __version__
from spp_peft.pruning.config import PruningConfig
from spp_peft.sparsity import SparsityReport


@dataclass
class LayerPruning:
    """What pruning did to one layer (shape is ``(out, in)``)."""

    name: str
    shape: list[int]
    zeros: int
    pattern: str
    seconds: float

    @property
    def sparsity(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.zeros / total if total else 0.0


@dataclass
class PruningResult:
    """The outcome of :func:`prune`: per-layer information, wall time and the model's sparsity report."""

    config: PruningConfig
    layers: list[LayerPruning]
    seconds: float
    report: SparsityReport
    nsamples: int = 0
    seqlen: int = 0

    def metadata(self) -> dict:
        """The JSON-able dict stored in ``model.config.spp_pruning`` (see :func:`pruning_metadata`)."""
        cfg = self.config
        used = cfg.pruning_method.options

        def option(name: str, value):
            # Options of other methods would describe a run that never happened: recorded as None.
            return value if name in used else None

        return {
            "method": cfg.method,
            "sparsity": cfg.effective_sparsity,
            "pattern": cfg.pattern,
            "comparison": option("comparison", cfg.comparison),
            "target_modules": cfg.target_modules,
            "calibration": {
                "source": cfg.calibration_source,
                "nsamples": self.nsamples,
                "seqlen": self.seqlen,
                "seed": cfg.seed,
            }
            if cfg.needs_calibration
            else None,
            "blocksize": option("blocksize", cfg.effective_blocksize),
            "percdamp": option("percdamp", cfg.percdamp),
            "pruned_layers": [layer.name for layer in self.layers],
            "total_sparsity_of_pruned_layers": self._pruned_sparsity(),
            "seconds": round(self.seconds, 3),
            "spp_peft_version": __version__,
        }

    def _pruned_sparsity(self) -> float:
        total = sum(layer.shape[0] * layer.shape[1] for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "seconds": self.seconds,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "layers": [dict(asdict(layer), sparsity=layer.sparsity) for layer in self.layers],
            "report": self.report.to_dict(),
        }

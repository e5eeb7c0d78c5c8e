"""``spp-peft inspect PATH``: what a model folder, an adapter or a run folder holds, and whether a model
still is what its metadata says.

A model that records its pruning (``config.spp_pruning``) is checked layer by layer against that record:
every recorded layer is listed (also one that lost its zeros) and a layer that no longer matches fails
the command with a :class:`~spp_peft.sparsity.SparsityViolation` (exit 3). Without a record only the
linear layers of the decoder blocks are reported (what the pruners target), so a dense model reads as
dense, not as "an embedding with 0.39% zeros".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from spp_peft.errors import RecipeError, UnreadableInput, reading

#: A layer name inside a decoder block (``model.layers.3.mlp.up_proj``, ``transformer.h.0.attn.c_attn``).
_IN_BLOCK = re.compile(r"\.\d+\.")
#: Unstructured pruning keeps the recorded ratio per layer up to rounding (per row or per block); a layer
#: this far below the recorded sparsity lost zeros.
SPARSITY_TOLERANCE = 0.02


def read_json(path: Path) -> dict:
    with reading(path):
        data = json.loads(path.read_bytes().decode("utf-8"))
    if not isinstance(data, dict):
        raise UnreadableInput(f"cannot read {path}: expected a JSON object, got {type(data).__name__}")
    return data


def inspect_path(path: Path, max_rows: int) -> int:
    if not path.exists():
        raise RecipeError(f"{path} does not exist")
    if (path / "report.json").is_file():
        return _inspect_run(path)
    if (path / "adapter_config.json").is_file():
        return _inspect_adapter(path)
    return _inspect_model(path, max_rows)


def _inspect_run(path: Path) -> int:
    from spp_peft.report import format_table, read_report

    with reading(path / "report.json"):
        report = read_report(path)
    print(f"run {report.get('name')} ({report.get('model')}), {report.get('seconds', 0) / 60:.1f} min")
    print(format_table(report))
    return 0


def _inspect_adapter(path: Path) -> int:
    from spp_peft.training import METHOD_FILE, read_method

    config = read_json(path / "adapter_config.json")
    with reading(path / METHOD_FILE):
        method = read_method(path)
    print(f"adapter: {path}  method: {method}  peft_type: {config.get('peft_type')}")
    for key in ("r", "spp_alpha", "lora_alpha", "target_modules", "base_model_name_or_path"):
        if key in config:
            print(f"  {key}: {config[key]}")
    masks = config.get("base_masks") or {}
    if masks:
        patterns = sorted({m['pattern'] for m in masks.values()})
        mean = sum(m["sparsity"] for m in masks.values()) / len(masks)
        print(f"  base masks recorded: {len(masks)} modules, pattern(s) {', '.join(patterns)}, "
              f"mean sparsity {mean:.2%}")
    info = path / METHOD_FILE
    result = (read_json(info).get("result") or {}) if info.is_file() else {}
    if result:
        print(f"  trained: {result.get('steps')} steps, lr {result.get('lr')}, loss "
              f"{result.get('first_loss')} -> {result.get('final_loss')}")
    return 0


def _load_state(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".safetensors" for f in files):
        raise RecipeError(f"{path}: not a model folder with safetensors, an adapter, or a run folder")
    state = {}
    for f in files:
        with reading(f):
            state.update(load_file(str(f)))
    return state


def _inspect_model(path: Path, max_rows: int) -> int:
    from spp_peft.sparsity import SparsityViolation, sparsity_report

    state = _load_state(path)
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    pruning = config.get("spp_pruning") or {}
    sparsity_meta = config.get("spp_sparsity") or {}
    recorded = pruning.get("pruned_layers") or list(sparsity_meta.get("layers", {}))
    if not recorded:
        return _inspect_unrecorded(state, max_rows)
    pattern = pruning.get("pattern") or sparsity_meta.get("pattern")
    nm = pattern if pattern and pattern != "unstructured" else None
    # No exclude_dense: a recorded layer that lost all its zeros must show up, not vanish from the table.
    report = sparsity_report(state, include=recorded, expected_pattern=nm)
    print(report.format(max_rows=max_rows))
    if pruning:
        print(f"pruning: {pruning.get('method')} {pruning.get('pattern')} sparsity {pruning.get('sparsity')}")
    problems = _record_problems(report, recorded, nm, pruning.get("sparsity"))
    problems += _fingerprint_problems(state, sparsity_meta)
    if problems:
        for line in problems:
            print(f"NOT AS RECORDED: {line}")
        raise SparsityViolation(f"{len(problems)} recorded pruned layer(s) no longer match their record, "
                                f"first: {problems[0]}")
    return 0


def _record_problems(report, recorded: list[str], nm, sparsity) -> list[str]:
    """The recorded pruned layers that are missing, dense, off the N:M pattern or far below the ratio."""
    layers = {layer.name: layer for layer in report.layers}
    problems = [f"{name}: missing from the weights" for name in recorded if name not in layers]
    failing = set(report.compliant(nm)) if nm else set()
    for name in recorded:
        layer = layers.get(name)
        if layer is None:
            continue
        low = not nm and sparsity is not None and layer.sparsity < float(sparsity) - SPARSITY_TOLERANCE
        if layer.zeros == 0 or name in failing or low:
            expected = nm or f"{float(sparsity or 0):.2%} sparse"
            problems.append(f"{name}: {layer.sparsity:.2%} sparse, pattern {layer.pattern} (recorded: {expected})")
    return problems


def _fingerprint_problems(state: dict, sparsity_meta: dict) -> list[str]:
    """Layers whose mask fingerprint differs from the one an export recorded in ``spp_sparsity``."""
    from spp_peft.sparsity import describe_mask

    if not sparsity_meta:
        return []
    recorded = sparsity_meta.get("layers", {})
    bad = [n for n, rec in recorded.items()
           if f"{n}.weight" not in state or describe_mask(state[f"{n}.weight"]).fingerprint != rec.get("fingerprint")]
    print(f"spp_sparsity metadata: method {sparsity_meta.get('method')}, {len(recorded)} layers recorded; "
          + ("all mask fingerprints match the weights" if not bad else f"{len(bad)} MISMATCH(ES), first: {bad[0]}"))
    return [f"{name}: mask fingerprint MISMATCH with spp_sparsity" for name in bad]


def _inspect_unrecorded(state: dict, max_rows: int) -> int:
    """No pruning record: report the decoder blocks' linear layers that hold zeros, or say it is dense."""
    from spp_peft.sparsity import linear_weights, sparsity_report

    blocks = [name for name in linear_weights(state) if _IN_BLOCK.search(name)]
    report = sparsity_report(state, include=blocks, exclude_dense=True)
    report.layers = [layer for layer in report.layers if layer.name in set(blocks)]
    if not report.layers:
        print(f"dense model: none of the {len(blocks)} linear layers of the decoder blocks holds a zero "
              "(no pruning recorded in config.json)")
        return 0
    print(report.format(max_rows=max_rows))
    print(f"{len(report.layers)} of {len(blocks)} decoder linear layers hold zeros (no pruning recorded)")
    return 0

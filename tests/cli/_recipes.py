"""A small recipe on the tiny test model, written to a YAML file, shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_recipe(path: Path, model, out, name: str = "cli", **changes) -> Path:
    """Write the recipe to ``path``; ``changes`` set keys as ``section__key=value``."""
    data = {
        "name": name,
        "output_dir": str(out),
        "model": {"name_or_path": str(model)},
        "pruning": {"method": "magnitude", "pattern": "2:4"},
        "data": {"cutoff_len": 32, "max_samples": 8},
        "train": {"methods": ["spp"], "max_steps": 1, "batch_size": 2, "r": 4, "progress": False},
        "eval": {"seqlen": 32, "max_tokens": 128, "datasets": {"heldout": "builtin:heldout"}},
        "report": {"plots": False},
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    path.write_text(yaml.safe_dump(data))
    return path

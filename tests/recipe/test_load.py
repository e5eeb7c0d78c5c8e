"""Loading recipes: YAML 1.2 scalars, and the committed paper recipes load with the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from spp_peft.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_scalars_are_yaml_1_2():
    recipe = load_recipe("pruning:\n  pattern: 2:4\ntrain:\n  lr: 1e-3\n  resume: false\n", check_paths=False)
    assert recipe.pruning.pattern == "2:4" and recipe.train.lr == 1e-3 and recipe.train.resume is False
    with pytest.raises(RecipeError, match="duplicate key 'lr'"):
        load_recipe("train:\n  lr: 1\n  lr: 2\n", check_paths=False)
    with pytest.raises(RecipeError, match="train.resume: expected bool"):
        load_recipe("train:\n  resume: yes\n", check_paths=False)


PAPER_LR = {"7b": 4e-3, "13b": 2e-3, "30b": 4e-3, "65b": 5e-4, "70b": 5e-4}


def test_paper_recipes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", ROOT / "configs" / "paper" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    expected = generate.recipes()
    files = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
    assert {p.name: p.read_text() for p in files} == expected, "run configs/paper/generate.py"
    assert len(files) == 7 * 2 * 4
    for path in files:
        recipe = load_recipe(str(path), check_paths=False)
        size = path.stem.split("-")[-3] if path.stem.startswith("llama-2") else path.stem.split("-")[1]
        assert recipe.train.lr == PAPER_LR[size], path.name
        assert (recipe.train.r, recipe.train.alpha, recipe.train.epochs) == (16, 32, 3)
        assert recipe.train.batch_size * recipe.train.grad_accum == 128 and recipe.data.cutoff_len == 512
        assert recipe.train.warmup == 0.03 and recipe.train.weight_decay == 0.001
        assert recipe.data.source == "vicgalle/alpaca-gpt4" and recipe.data.format == "alpaca"
        assert recipe.pruning.method in ("wanda", "sparsegpt")

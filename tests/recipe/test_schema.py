"""The recipe's schema: built on the training stage's light config module, not on its trainer."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from spp_peft import errors, recipe
from spp_peft.training import DataConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_recipe_does_not_import_the_trainer():
    heavy = ("spp_peft.training.trainer", "spp_peft.tuner", "peft", "transformers")
    code = f"import sys, spp_peft.recipe; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_sections_are_the_training_dataclasses():
    r = recipe.Recipe()
    assert type(r.data) is DataConfig and isinstance(r.train, TrainConfig)
    assert type(r.train) is recipe.TrainSection
    assert recipe.section_classes()["data"] is DataConfig


def test_a_loaded_recipe_pickles():
    loaded = recipe.load_recipe(recipe.quickstart_yaml(), ["train.method_lr.spp=1e-2"], check_paths=False)
    again = pickle.loads(pickle.dumps(loaded))
    assert again == loaded and again.train.lr_for("spp") == 1e-2


def test_recipe_error_is_the_shared_error_type():
    assert recipe.RecipeError is errors.RecipeError and issubclass(recipe.RecipeError, ValueError)

"""The run folder: checked before any work, held for the whole run, cleared for ``--overwrite``, logged to.

A folder is accepted when it is new or empty, when ``overwrite`` is given, or when it holds a run of this very
recipe and ``train.resume`` is on (the rerun continues it: checkpoints resume, every other output is rebuilt
the same).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from spp_peft.recipe import Recipe, RecipeError

logger = logging.getLogger("spp_peft.pipeline")


def check_output_dir(recipe: Recipe, overwrite: bool = False) -> Path:
    """The run folder of ``recipe``, checked before any work: an empty ``output_dir`` (the current folder)
    is refused; so is a non-empty folder, unless ``overwrite`` or it holds a run of this very recipe and
    ``train.resume`` is on."""
    from spp_peft._utils import check_output

    raw = recipe.output_dir.replace("{name}", recipe.name)
    if not raw.strip():
        raise RecipeError("output_dir is empty (it would write into the current folder); name the run folder")
    out = Path(raw).expanduser()
    resume = recipe.train.resume and _same_recipe(out / "recipe.yaml", recipe)
    try:
        return check_output(out, overwrite=overwrite or resume)
    except ValueError as err:  # a file where a folder should be, a read-only folder
        raise RecipeError(f"output_dir: {err}") from None


@contextmanager
def claim_output_dir(recipe: Recipe, overwrite: bool):
    """Hold the run folder for the whole run (a second run into it fails at once), check it again now that
    no other run can be writing there, and record the recipe."""
    from spp_peft._utils import atomic_write_file, exclusive

    with exclusive(recipe.out_dir) as out:
        check_output_dir(recipe, overwrite)
        if (out / "recipe.yaml").is_file() and not _same_recipe(out / "recipe.yaml", recipe):
            _clear_run(out)
        atomic_write_file(out / "recipe.yaml", recipe.to_yaml())
        yield out


def _clear_run(out: Path) -> None:
    """Remove the outputs of the previous run that ``--overwrite`` replaces, before the new run writes
    anything: otherwise a failure halfway would leave the new pruned base beside the old adapters. Files
    that are not part of a run's layout (:mod:`spp_peft.pipeline`) are left alone."""
    import shutil

    from spp_peft.training import METHODS

    entries = ("recipe.yaml", "run.log", "report.md", "report.json", "plots", "pruned", "merged", *METHODS)
    logger.warning("%s: --overwrite: removing the previous run (%s)", out, ", ".join(
        name for name in entries if (out / name).exists()))
    for name in entries:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def _same_recipe(path: Path, recipe: Recipe) -> bool:
    """Whether ``path`` (a run's ``recipe.yaml``) is ``recipe``, up to settings that change no result."""
    import yaml

    from spp_peft.training import _VOLATILE

    def key(data) -> dict:
        train = {k: v for k, v in (data.get("train") or {}).items() if k not in _VOLATILE}
        return {**data, "train": train}

    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(stored, dict) and key(stored) == key(yaml.safe_load(recipe.to_yaml()))


@contextmanager
def log_to(path: Path):
    """Copy the library's log (INFO and up, or what the caller set lower) into ``path`` while the block runs."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("spp_peft")
    previous = root.level
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()

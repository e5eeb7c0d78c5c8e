"""The spp-peft command line: every subcommand end to end on a tiny model, bad recipes, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spp_peft import cli
from spp_peft.recipe import RecipeError, load_recipe, quickstart_yaml

from ._recipes import tiny_recipe
from .._pipeline_fixtures import one_thread, save_dense, all_threads  # noqa: F401 (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_dense(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def chain(tiny_dir, tmp_path_factory):
    """prune -> train -> merge through the CLI, shared by the tests below."""
    work = tmp_path_factory.mktemp("cli")
    pruned, run_dir, merged = work / "pruned", work / "spp", work / "merged"
    assert cli.main(["prune", "--model", str(tiny_dir), "--method", "wanda", "--pattern", "2:4",
                     "--nsamples", "4", "--seqlen", "32", "--output", str(pruned), "-q"]) == 0
    assert cli.main(["train", "--model", str(pruned), "--method", "spp", "--data", "builtin", "--cutoff-len", "32",
                     "--max-samples", "8", "--max-steps", "2", "--batch-size", "2", "--r", "4", "--lr", "2e-2",
                     "--output", str(run_dir), "-q"]) == 0
    assert cli.main(["merge", "--model", str(pruned), "--adapter", str(run_dir / "adapter"),
                     "--output", str(merged)]) == 0
    return {"pruned": pruned, "run": run_dir, "merged": merged, "work": work}


def test_prune_saves_a_2_4_model(chain, capsys):
    config = json.loads((chain["pruned"] / "config.json").read_text())
    assert config["spp_pruning"]["method"] == "wanda" and config["spp_pruning"]["pattern"] == "2:4"
    assert config["spp_pruning"]["calibration"] == {"source": "builtin", "nsamples": 4, "seqlen": 32, "seed": 0}
    assert cli.main(["inspect", str(chain["pruned"])]) == 0
    out = capsys.readouterr().out
    assert "2:4 compliance: all layers" in out


def test_train_writes_adapter_and_log(chain):
    info = json.loads((chain["run"] / "adapter" / "spp_peft_training.json").read_text())
    assert info["method"] == "spp" and info["lr"] == 2e-2 and info["train"]["r"] == 4
    assert info["data"]["cutoff_len"] == 32 and info["result"]["steps"] == 2
    log = json.loads((chain["run"] / "train_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2]


def test_merge_exports_verified_model(chain, capsys):
    config = json.loads((chain["merged"] / "config.json").read_text())
    assert config["spp_sparsity"]["method"] == "spp"
    assert cli.main(["inspect", str(chain["merged"])]) == 0
    assert "all mask fingerprints match the weights" in capsys.readouterr().out
    # Refuses to overwrite without --overwrite, before loading anything.
    assert cli.main(["merge", "--model", str(chain["pruned"]), "--adapter", str(chain["run"] / "adapter"),
                     "--output", str(chain["merged"])]) == 2


def test_inspect_detects_a_tampered_export(chain, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    copy_dir = tmp_path / "tampered"
    shutil.copytree(chain["merged"], copy_dir)
    state = load_file(str(copy_dir / "model.safetensors"))
    name = next(k for k in state if k.endswith("q_proj.weight"))
    state[name] = state[name].clone()
    state[name][state[name] == 0] = 1.0
    save_file(state, str(copy_dir / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["inspect", str(copy_dir)]) == 3
    assert "MISMATCH" in capsys.readouterr().out


def test_eval_merged_equals_eval_with_adapter(chain, capsys):
    args = ["--data", "heldout=builtin:heldout", "--seqlen", "32", "--max-tokens", "256", "--json", "-q"]
    assert cli.main(["eval", "--model", str(chain["merged"]), *args]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", "--model", str(chain["pruned"]), "--adapter", str(chain["run"] / "adapter"), *args]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert merged["tokens"]["heldout"] == 256
    assert merged["perplexity"]["heldout"] == pytest.approx(adapted["perplexity"]["heldout"], rel=1e-5)
    assert merged["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_inspect_adapter(chain, capsys):
    assert cli.main(["inspect", str(chain["run"] / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "method: spp" in out and "pattern(s) 2:4" in out and "trained: 2 steps" in out


def _write_recipe(path: Path, tiny_dir, out, **changes) -> Path:
    return tiny_recipe(path, tiny_dir, out, **changes)


def test_run_recipe_with_overrides(tiny_dir, tmp_path, capsys):
    recipe = _write_recipe(tmp_path / "r.yaml", tiny_dir, tmp_path / "out")
    assert cli.main(["run", str(recipe), "--set", "train.lr=2e-2", "--train.max_steps", "2",
                     "--eval.datasets.ood=builtin:ood", "-q"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recipe"]["train"]["lr"] == 2e-2
    assert report["training"]["spp"]["steps"] == 2
    assert set(report["perplexity"]) == {"heldout", "ood"}
    out = capsys.readouterr().out
    assert "SPP" in out and "report:" in out
    assert cli.main(["inspect", str(tmp_path / "out")]) == 0
    assert "pruned" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, override, message",
    [
        ({"train__max_step": 3}, [], "unknown key train.max_step; did you mean 'max_steps'"),
        ({"train__max_steps": "ten"}, [], "train.max_steps: expected int, got 'ten'"),
        ({"data__source": "missing.txt"}, [], "data.source: file 'missing.txt' does not exist"),
        ({"pruning__pattern": 124}, [], "pruning.pattern: expected a string"),
        ({}, ["--set", "train.methods=spp,dora"], "unknown method 'dora'"),
        ({}, ["--set", "eval.seqlen"], "must look like KEY=VALUE"),
        ({}, ["--bogus", "1"], "unrecognized argument '--bogus'"),
    ],
)
def test_bad_recipes_fail_before_any_work(tiny_dir, tmp_path, capsys, change, override, message):
    out = tmp_path / "out"
    recipe = _write_recipe(tmp_path / "r.yaml", tiny_dir, out, **change)
    assert cli.main(["run", str(recipe), *override]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not out.exists(), "nothing may be written for a bad recipe"


def test_missing_recipe_and_model(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--model", str(tmp_path / "nomodel"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--model", "smollm2", "--max-steps", "x", "--output", str(tmp_path / "o")]) == 2
    assert "train.max_steps: expected int" in capsys.readouterr().err


def test_keys_lists_every_section(capsys):
    assert cli.main(["keys"]) == 0
    out = capsys.readouterr().out
    for key in ("model.name_or_path", "pruning.pattern", "pruning.nsamples", "data.train_on_inputs", "train.lr",
                "train.method_lr", "eval.datasets", "export.methods", "report.plots"):
        assert key in out
    # The pruning keys are PruningConfig's fields, documented by its docstring.
    assert "N:M" in next(line for line in out.splitlines() if line.startswith("pruning.pattern "))


def test_estimate_delegates(tiny_dir, capsys):
    pytest.importorskip("spp_peft.estimate")
    assert cli.main(["estimate", "--model", str(tiny_dir), "--seq-len", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_quickstart_recipe_is_shipped_once_and_valid(capsys):
    """One file: the package data that `spp-peft demo` reads; configs/quickstart.yaml links to it."""
    packaged = ROOT / "spp_peft" / "recipe" / "quickstart.yaml"
    assert (ROOT / "configs" / "quickstart.yaml").resolve() == packaged.resolve()
    assert quickstart_yaml() == packaged.read_text()
    recipe = load_recipe(quickstart_yaml(), check_paths=False)
    assert recipe.pruning.pattern == "2:4" and recipe.train.methods == ["spp", "lora_star"]
    assert cli.main(["demo", "--print-recipe", "--set", "train.max_steps=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] == 3


@pytest.mark.parametrize("flags, expected", [
    ([], False), (["--bf16"], True), (["--no-bf16"], False), (["--bf16", "false"], False), (["--bf16", "true"], True),
])
def test_bool_fields_are_bare_flags(flags, expected):
    from spp_peft.training import TrainConfig

    args = cli.build_parser().parse_args(["train", "--model", "m", "--output", "o", *flags])
    assert cli.dataclass_from_flags(args, TrainConfig, "train").bf16 is expected


def test_bool_flag_values_are_checked(capsys):
    from spp_peft.training import TrainConfig

    args = cli.build_parser().parse_args(["train", "--model", "m", "--output", "o", "--resume", "maybe"])
    with pytest.raises(RecipeError, match="train.resume: expected bool"):
        cli.dataclass_from_flags(args, TrainConfig, "train")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--model", "m", "--output", "o", "--no-resume", "true"])
    assert "--no-resume takes no value" in capsys.readouterr().err


def test_command_line_entry_point(tmp_path):
    """The installed `spp-peft` script (what `make demo` runs), else `python -m spp_peft`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = Path(sys.executable).with_name("spp-peft")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "spp_peft"]
    done = subprocess.run([*command, "keys"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "train.lr" in done.stdout
    done = subprocess.run([sys.executable, "-m", "spp_peft.cli", "keys"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "train.lr" in done.stdout, done.stderr


@pytest.mark.slow
def test_demo_with_a_tiny_budget(tmp_path, capsys, smollm2_cache):
    """The demo recipe on the real SmolLM2-135M, every stage, with a budget small enough for CI."""
    with all_threads():
        code = cli.main([
            "demo", "--output-dir", str(tmp_path / "demo"), "-q",
            "--set", "pruning.nsamples=4", "--set", "pruning.seqlen=128",
            "--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "data.cutoff_len=64",
            "--set", "eval.seqlen=128", "--set", "eval.max_tokens=256", "--set", "train.save_steps=0",
        ])
    assert code == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    for ds in ("heldout", "ood"):
        ppl = report["perplexity"][ds]
        assert set(ppl) == {"dense", "pruned", "spp", "lora_star"}
        assert ppl["pruned"] > ppl["dense"]
    assert report["verified"]["spp"]["ok"] and report["verified"]["lora_star"]["ok"]
    assert report["verified"]["spp"]["layers"] == 210  # 30 blocks x 7 projections
    assert (tmp_path / "demo" / "merged" / "spp" / "model.safetensors").is_file()
    assert "SPP" in capsys.readouterr().out


def test_train_continues_when_only_the_budget_grew(chain, tmp_path):
    """HF users' resume: rerun with a larger --max-steps continues the run and keeps its checkpoints."""
    run = tmp_path / "spp"
    args = ["train", "--model", str(chain["pruned"]), "--method", "spp", "--data", "builtin", "--cutoff-len", "32",
            "--max-samples", "8", "--batch-size", "2", "--r", "4", "--save-steps", "2", "--output", str(run), "-q"]
    assert cli.main([*args, "--lr", "2e-2", "--max-steps", "2"]) == 0
    checkpoints = {p.name for p in (run / "checkpoints").glob("checkpoint-*")}
    assert checkpoints
    assert cli.main([*args, "--lr", "2e-2", "--max-steps", "4", "--resume-from-checkpoint"]) == 0
    info = json.loads((run / "adapter" / "spp_peft_training.json").read_text())
    assert info["result"]["steps"] == 4
    assert checkpoints <= {p.name for p in (run / "checkpoints").glob("checkpoint-*")}
    # other settings: refused (exit 2), nothing deleted
    assert cli.main([*args, "--lr", "5e-2", "--max-steps", "4"]) == 2
    assert checkpoints <= {p.name for p in (run / "checkpoints").glob("checkpoint-*")}

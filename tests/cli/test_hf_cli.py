"""The command line in the ecosystem's language: TrainingArguments flag names, any TrainingArguments field
as a flag, quiet runs without a single progress bar, the global switches respected, ``autoload`` and
``eval --include-path`` on a local lm-eval task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spp_peft import cli

from .._pipeline_fixtures import one_thread, save_pruned_tiny  # noqa: F401 (one_thread: autouse fixture)
from ..test_evaluation import write_tiny_task

ROOT = Path(__file__).resolve().parents[2]
BARS = ("it/s", "%|", "examples/s", "s/it", "batch/s")


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    return save_pruned_tiny(tmp_path_factory.mktemp("pruned"))


def _train_config(flags):
    from spp_peft.training import TrainConfig

    args = cli.build_parser().parse_args(["train", "--model", "m", "--output", "o", *flags])
    return cli.dataclass_from_flags(args, TrainConfig, "train")


def test_hf_flag_names_and_short_aliases_are_the_same_settings():
    hf = _train_config(["--learning-rate", "2e-2", "--per_device_train_batch_size", "2",
                        "--gradient-accumulation-steps", "3", "--num_train_epochs", "1", "--lr_scheduler_type", "cosine"])
    short = _train_config(["--lr", "2e-2", "--batch-size", "2", "--grad-accum", "3", "--epochs", "1",
                           "--lr-scheduler", "cosine"])
    assert hf == short and hf.lr == 2e-2


def test_train_refuses_an_unknown_training_argument_before_any_work(pruned_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", "--model", str(pruned_dir), "--output", str(out), "--max-steps", "1",
                     "--lable_smoothing_factor", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'label_smoothing_factor'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _spp_peft(args, tmp_path, **env):
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"),
                    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    if "TQDM_DISABLE" not in env:  # the switch is the test's to set, not the caller's shell
        full_env.pop("TQDM_DISABLE", None)
    return subprocess.run([sys.executable, "-m", "spp_peft", *args], capture_output=True, text=True, env=full_env,
                          cwd=tmp_path, timeout=600)


def test_quiet_train_shows_no_progress_bar(pruned_dir, tmp_path):
    """-q quiets every bar: the Trainer's, datasets' (a local text file goes through datasets), transformers'."""
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(20)))
    done = _spp_peft(["train", "--model", str(pruned_dir), "--data", str(text), "--cutoff-len", "32",
                      "--max-samples", "8", "--max_steps", "2", "--per_device_train_batch_size", "2", "--r", "4",
                      "--report_to", "none", "--output", str(tmp_path / "out"), "-q"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert not [bar for bar in BARS if bar in done.stderr], done.stderr
    assert (tmp_path / "out" / "adapter").is_dir()


def test_tqdm_disable_is_respected(pruned_dir, tmp_path):
    done = _spp_peft(["eval", "--model", str(pruned_dir), "--data", "heldout=builtin:heldout", "--seqlen", "32",
                      "--max-tokens", "128"], tmp_path, TQDM_DISABLE="1")
    assert done.returncode == 0, done.stderr
    assert not [bar for bar in BARS if bar in done.stderr], done.stderr


def test_our_bars_follow_transformers_switch(capsys):
    import torch
    from transformers.utils import logging as hf_logging

    from spp_peft.evaluation import perplexity
    from spp_peft.testing import tiny_llama

    model, ids = tiny_llama(), torch.arange(256) % 200
    hf_logging.enable_progress_bar()
    perplexity(model, ids, seqlen=32)
    assert "perplexity" in capsys.readouterr().err
    hf_logging.disable_progress_bar()
    try:
        perplexity(model, ids, seqlen=32)
        assert "perplexity" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()


def test_autoload_subcommand(tmp_path, capsys):
    from spp_peft import autoload

    assert cli.main(["autoload", "status", "--target", str(tmp_path)]) == 0
    assert "disabled" in capsys.readouterr().out
    assert cli.main(["autoload", "enable", "--target", str(tmp_path)]) == 0
    assert (tmp_path / autoload.PTH_NAME).read_text() == autoload.PTH_LINE
    assert cli.main(["autoload", "status", "--target", str(tmp_path)]) == 0
    assert "enabled" in capsys.readouterr().out
    assert cli.main(["autoload", "disable", "--target", str(tmp_path)]) == 0
    assert not (tmp_path / autoload.PTH_NAME).exists()


def test_eval_runs_a_local_lm_eval_task(pruned_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    task = write_tiny_task(tmp_path / "tasks")
    common = ["eval", "--model", str(pruned_dir), "--data", "heldout=builtin:heldout", "--seqlen", "32",
              "--max-tokens", "64", "--json", "-q"]
    assert cli.main([*common, "--tasks", "tiny_mc", "--include-path", str(tmp_path / "tasks")]) == 0
    by_name = json.loads(capsys.readouterr().out)["zero_shot"]
    assert cli.main([*common, "--tasks", str(task), "--include-path", str(tmp_path / "tasks")]) == 0
    assert json.loads(capsys.readouterr().out)["zero_shot"] == by_name and list(by_name) == ["tiny_mc"]
    assert cli.main([*common, "--tasks", "no_such_task", "--include-path", str(tmp_path / "tasks")]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s): 'no_such_task'" in err and len(err.strip().splitlines()) == 1


def test_eval_include_path_must_be_a_folder(pruned_dir, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(pruned_dir), "--tasks", "x", "--include-path", str(tmp_path / "no")]) == 2
    assert "eval.include_path" in capsys.readouterr().err


def test_dotted_bool_keys_are_bare_flags_too():
    assert cli.split_dotted(["--train.bf16", "--train.learning_rate", "1e-2", "--train.resume"]) == [
        "train.bf16=true", "train.learning_rate=1e-2", "train.resume=true"]
    assert cli.split_dotted(["--train.bf16", "false"]) == ["train.bf16=false"]

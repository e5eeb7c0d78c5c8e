"""The CLI's error boundary: every expected failure is one line on stderr with a documented exit code,
checked before any expensive work, never a traceback (unless -v / --debug), never an unbounded message."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spp_peft import cli

from ._recipes import tiny_recipe
from .._pipeline_fixtures import one_thread, save_dense, save_pruned_tiny  # noqa: F401 (one_thread: autouse)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_dense(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    return save_pruned_tiny(tmp_path_factory.mktemp("pruned") / "model")


def fails(capsys, argv, code, *needles):
    """Run the CLI; assert the exit code and exactly one stderr line without a traceback; return it."""
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[:2000]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _recipe(path: Path, model, out, **changes) -> Path:
    return tiny_recipe(path, model, out, name="errors", **{"eval__max_tokens": 64, "eval__dense": False, **changes})


# ------------------------------------------------------------------------------------ bounded messages


def test_nested_yaml_aliases_give_a_short_message(tmp_path, capsys):
    """A ~300-byte "billion laughs" recipe: the value's full repr is tens of MB; the message stays short."""
    text = "train:\n  lr: [&a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"
    for i in range(1, 7):
        text += f", &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]"
    path = tmp_path / "laughs.yaml"
    path.write_text(text + "]\n")
    assert len(path.read_bytes()) < 400
    line = fails(capsys, ["run", str(path)], 2, "train.lr")
    assert len(line) < 2000


def test_quote_is_bounded_for_shared_nested_values():
    from spp_peft.errors import QUOTE_LIMIT, one_line, quote

    value = ["lol"] * 9
    for _ in range(12):  # 9**12 leaves, all shared: repr() would never finish
        value = [value] * 9
    assert len(quote(value)) <= QUOTE_LIMIT and len(quote("x" * 10**6)) <= QUOTE_LIMIT
    assert one_line("a\n  b\tc", 100) == "a b c" and len(one_line("y" * 10**5)) <= 2000


def test_non_utf8_recipe(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    fails(capsys, ["run", str(path)], 2, "latin1.yaml", "UTF-8")


# ------------------------------------------------------------------------------- unreadable files: exit 4


def test_truncated_safetensors(pruned_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pruned_dir, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    fails(capsys, ["inspect", str(broken)], 4, "model.safetensors")
    fails(capsys, ["eval", "--model", str(broken), "--seqlen", "32", "--max-tokens", "64"], 4, str(broken))
    # -v / --debug (before or after the command) show the traceback.
    for argv in (["-v", "inspect", str(broken)], ["inspect", str(broken), "--debug"]):
        assert cli.main(argv) == 4
        assert "Traceback" in capsys.readouterr().err


def test_broken_json(pruned_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "badjson"
    shutil.copytree(pruned_dir, broken)
    (broken / "config.json").write_text('{"model_type": ')
    fails(capsys, ["inspect", str(broken)], 4, "config.json")
    fails(capsys, ["eval", "--model", str(broken), "--seqlen", "32"], 4, "config.json")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{")
    fails(capsys, ["inspect", str(adapter)], 4, "adapter_config.json")


def test_full_disk_while_saving(tiny_dir, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    out = tmp_path / "out" / "pruned"
    fails(capsys, ["prune", "--model", str(tiny_dir), "--method", "magnitude", "--pattern", "2:4",
                   "--output", str(out), "-q"], 4, "no space left on device")
    assert not out.exists()
    assert not [p for p in out.parent.iterdir()], "no half-written leftovers"


def test_classify_no_space_from_safetensors_and_unknown_errors():
    """safetensors' Rust writer says ENOSPC only in its text; other exceptions are bugs (exit 1)."""
    from spp_peft.cli.errors import EXIT_FAILED, EXIT_IO, classify

    rust = type("SafetensorError", (Exception,), {})("Error while serializing: I/O error: No space left on "
                                                     "device (os error 28)")
    assert classify(rust) == (EXIT_IO, "error: no space left on device; free space and rerun")
    code, message = classify(ZeroDivisionError("division by zero"))
    assert code == EXIT_FAILED and "ZeroDivisionError" in message and "-v" in message


# -------------------------------------------------------------------------- validation before any work


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "inf"], "train.lr"),
    (["--lr", "nan"], "train.lr"),
    (["--lr", ".inf"], "train.lr"),
    (["--lr", ".nan"], "train.lr"),
    (["--lr", "0"], "train.lr"),
    (["--alpha", "nan"], "train.alpha"),
    (["--alpha", "1e40"], "train.alpha"),
    (["--optim", "bogus"], "train.optim"),
    (["--lr-scheduler", "bogus"], "train.lr_scheduler"),
    (["--epochs", "inf", "--max-steps", "-1"], "train.epochs"),
    (["--target-modules", "nope"], "nope"),
    (["--target-modules", "q_proj,input_layernorm"], "input_layernorm"),
    (["--r", "4096"], "train.r"),
    (["--r", "0"], "train.r must be >= 1"),
])
def test_train_refuses_bad_settings_before_work(pruned_dir, tmp_path, capsys, flags, needle):
    out = tmp_path / "train"
    fails(capsys, ["train", "--model", str(pruned_dir), "--max-steps", "1", "--output", str(out), "-q", *flags],
          2, needle)
    assert not out.exists()


@pytest.mark.parametrize("change, needle", [
    ({"train__r": 4096}, "train.r"),
    ({"train__optim": "bogus"}, "train.optim"),
    ({"train__lr_scheduler": "bogus"}, "train.lr_scheduler"),
    ({"train__target_modules": ["nope"]}, "nope"),
    ({"train__alpha": float("nan")}, "train.alpha"),
    ({"train__method_lr": {"spp": float("inf")}}, "train.method_lr.spp"),
    ({"pruning__target_modules": ["nope"]}, "pruning.target_modules"),
])
def test_run_validates_against_the_model_before_pruning(tiny_dir, tmp_path, capsys, change, needle):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.yaml", tiny_dir, out, **change)
    fails(capsys, ["run", str(recipe)], 2, needle)
    assert not out.exists(), "nothing may be written (or pruned) for a bad recipe"


def test_empty_output_dir_is_refused(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path / "r.yaml", tiny_dir, tmp_path / "out")
    fails(capsys, ["run", str(recipe), "--set", "output_dir="], 2, "output_dir must not be empty")
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


@pytest.mark.parametrize("content, needle", [(b"", "empty"), (b"  \n\n", "empty"), (b"caf\xe9 au lait\n", "UTF-8")])
def test_bad_data_files(tiny_dir, pruned_dir, tmp_path, capsys, content, needle):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.yaml", tiny_dir, out, data__source=str(data))
    fails(capsys, ["run", str(recipe)], 2, "data.txt", needle)
    assert not out.exists()
    fails(capsys, ["train", "--model", str(pruned_dir), "--data", str(data), "--output", str(out)], 2, needle)
    fails(capsys, ["eval", "--model", str(pruned_dir), "--data", str(data)], 2, needle)
    assert not out.exists()


def test_broken_jsonl_data(pruned_dir, tmp_path, capsys):
    data = tmp_path / "records.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    fails(capsys, ["train", "--model", str(pruned_dir), "--data", str(data), "--format", "alpaca",
                   "--output", str(tmp_path / "o")], 2, "records.jsonl", "line 2")


@pytest.mark.parametrize("flags, needle", [
    (["--seqlen", "0"], "seqlen"),
    (["--seqlen", "32", "--batch-size", "0"], "batch_size"),
    (["--seqlen", "32", "--max-tokens", "-5"], "max_tokens"),
])
def test_eval_refuses_bad_numbers(pruned_dir, capsys, flags, needle):
    fails(capsys, ["eval", "--model", str(pruned_dir), *flags], 2, needle)


@pytest.mark.parametrize("flags, needle", [
    (["--method", "wanda", "--nsamples", "0"], "nsamples must be >= 1"),
    (["--method", "wanda", "--seqlen", "1"], "seqlen >= 2"),
])
def test_prune_checks_calibration_numbers(tiny_dir, tmp_path, capsys, flags, needle):
    fails(capsys, ["prune", "--model", str(tiny_dir), *flags, "--output", str(tmp_path / "p"), "-q"], 2, needle)
    assert not (tmp_path / "p").exists()


def test_prune_errors_are_one_line(tiny_dir, tmp_path, capsys):
    fails(capsys, ["prune", "--model", str(tiny_dir), "--method", "magnitude", "--target-modules", "nope",
                   "--output", str(tmp_path / "p"), "-q"], 2, "nope")


@pytest.mark.parametrize("flags, needle", [
    (["--overhead-gib", "-1"], "overhead"),
    (["--chunk-rows", "0"], "chunk_rows"),
    (["--overhead-gib", "nan"], "overhead"),
])
def test_estimate_refuses_bad_numbers(tiny_dir, capsys, flags, needle):
    fails(capsys, ["estimate", "--model", str(tiny_dir), *flags], 2, needle)


def test_estimate_model_file(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    fails(capsys, ["estimate", "--model", str(text)], 2, "notes.txt")


def test_training_that_diverges_saves_nothing(pruned_dir, tmp_path, capsys):
    out = tmp_path / "train"
    fails(capsys, ["train", "--model", str(pruned_dir), "--data", "builtin", "--cutoff-len", "32", "--max-samples",
                   "8", "--max-steps", "3", "--batch-size", "2", "--r", "4", "--lr", "1e30", "--output", str(out),
                   "-q"], 5, "non-finite")
    assert not (out / "adapter").exists()


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_fails_on_a_densified_pruned_layer(pruned_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    copy_dir = tmp_path / "densified"
    shutil.copytree(pruned_dir, copy_dir)
    state = load_file(str(copy_dir / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = state[name].clone()
    state[name][state[name] == 0] = 0.5
    save_file(state, str(copy_dir / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["inspect", str(copy_dir)]) == 3
    captured = capsys.readouterr()
    assert "model.layers.1.mlp.down_proj" in captured.out, "the densified layer is listed"
    assert "compliance: all layers" not in captured.out
    assert "model.layers.1.mlp.down_proj" in captured.err and len(captured.err.splitlines()) == 1


def test_inspect_dense_model(tiny_dir, capsys):
    assert cli.main(["inspect", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "embed" not in out and "dense" in out


def test_inspect_pruned_model_still_passes(pruned_dir, capsys):
    assert cli.main(["inspect", str(pruned_dir)]) == 0
    assert "2:4 compliance: all layers" in capsys.readouterr().out


# ------------------------------------------------------------------------------ signals and pipes


def _python(code: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_ctrl_c_is_one_line_and_130():
    proc = _python("import sys, time\nfrom spp_peft import cli\n"
                   "cli.COMMANDS['keys'] = lambda args, extra: (print('ready', flush=True), time.sleep(120))\n"
                   "sys.exit(cli.main(['keys']))\n")
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines() == ["spp-peft keys: interrupted"]


def test_broken_pipe_exits_quietly():
    """`spp-peft ... | head -1`: the reader goes away; no traceback, no 'Exception ignored' noise."""
    proc = _python("import sys\nfrom spp_peft import cli\n"
                   "cli.COMMANDS['keys'] = lambda args, extra: [print('x' * 99) for _ in range(200000)] and 0\n"
                   "sys.exit(cli.main(['keys']))\n")
    try:
        assert proc.stdout.readline().startswith("x")
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert err == ""
    assert proc.returncode == cli.EXIT_BROKEN_PIPE

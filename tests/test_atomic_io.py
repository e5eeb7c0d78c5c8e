"""spp_peft._utils: every write is atomic (temporary sibling + fsync + rename), refuses to replace a non-empty
target without overwrite, survives kill -9 / a full disk / a concurrent writer; the CLI refuses to write into
a non-empty output folder before any work.

Fault injection runs on real code paths: a subprocess killed with SIGKILL in the middle of its writes, a
small tmpfs filled up (root only; a patched writer raising ENOSPC elsewhere), two writers racing."""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from spp_peft._utils import atomic as U
from spp_peft import cli
from spp_peft import pipeline as P
from spp_peft import training as T

from ._pipeline_fixtures import one_thread, pruned_tiny, save_dense  # noqa: F401 (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
UTILS = ROOT / "spp_peft" / "_utils" / "atomic.py"


def leftovers(folder: Path) -> list[str]:
    """Temporary or moved-aside siblings a write left behind."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def write_version(folder: Path, version: int, files: int = 4, size: int = 1 << 16) -> None:
    for i in range(files):
        (folder / f"part{i}.bin").write_bytes(bytes([version % 256]) * size)
    (folder / "manifest.json").write_text(json.dumps({"version": version, "files": files}))


def assert_complete(folder: Path) -> int:
    """``folder`` holds exactly one whole version; returns it."""
    manifest = json.loads((folder / "manifest.json").read_text())
    version = manifest["version"]
    for i in range(manifest["files"]):
        data = (folder / f"part{i}.bin").read_bytes()
        assert data == bytes([version % 256]) * len(data) and len(data) == 1 << 16, f"part{i} is not version {version}"
    return version


# ----------------------------------------------------------------------------------------- the helper


def test_new_folder_appears_whole_and_nothing_is_left(tmp_path):
    target = tmp_path / "out"
    with U.atomic_write_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        write_version(tmp, 1)
        assert not target.exists(), "the target may only appear complete"
    assert assert_complete(target) == 1
    assert leftovers(tmp_path) == []


def test_non_empty_target_is_refused_without_overwrite(tmp_path):
    target = tmp_path / "out"
    with U.atomic_write_dir(target) as tmp:
        write_version(tmp, 1)
    with pytest.raises(U.OutputExistsError, match=r"out.*already exists.*--overwrite") as err:
        with U.atomic_write_dir(target) as tmp:
            write_version(tmp, 2)
    assert isinstance(err.value, FileExistsError) and str(target) in str(err.value)
    assert assert_complete(target) == 1
    with U.atomic_write_dir(target, overwrite=True) as tmp:
        write_version(tmp, 2)
    assert assert_complete(target) == 2 and leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    with U.atomic_write_dir(tmp_path / "empty") as tmp:  # an empty folder is not "output"
        write_version(tmp, 3)
    assert assert_complete(tmp_path / "empty") == 3


def test_failure_inside_the_block_leaves_the_old_folder(tmp_path):
    target = tmp_path / "out"
    with U.atomic_write_dir(target) as tmp:
        write_version(tmp, 1)
    with pytest.raises(KeyboardInterrupt):
        with U.atomic_write_dir(target, overwrite=True) as tmp:
            (tmp / "part0.bin").write_bytes(b"\2" * 10)
            raise KeyboardInterrupt
    assert assert_complete(target) == 1 and leftovers(tmp_path) == []


@pytest.mark.parametrize("path", ["", "  ", None])
def test_empty_output_path_is_refused(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        U.check_output(path)
    with pytest.raises(ValueError, match="empty"):
        with U.atomic_write_dir(path):
            pass
    assert list(tmp_path.iterdir()) == []


def test_odd_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (".", "..", str(tmp_path), "/"):  # the current folder (or above it) is never replaced whole
        with pytest.raises(ValueError, match="current folder"):
            with U.atomic_write_dir(path, overwrite=True):
                pass
    (tmp_path / "file").write_text("a file")
    with pytest.raises(U.OutputExistsError):
        U.check_output(tmp_path / "file")
    with U.atomic_write_dir(tmp_path / "file", overwrite=True) as tmp:  # a file replaced by a folder
        write_version(tmp, 1)
    assert assert_complete(tmp_path / "file") == 1
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with U.atomic_write_dir(tmp_path / "link") as tmp:  # an empty folder behind a symlink: written there
        write_version(tmp, 2)
    assert (tmp_path / "link").is_symlink() and assert_complete(tmp_path / "real") == 2
    assert leftovers(tmp_path) == []


def test_atomic_write_file(tmp_path):
    path = tmp_path / "a" / "report.json"
    U.atomic_write_file(path, '{"v": 1}\n')
    assert path.read_text() == '{"v": 1}\n'
    U.atomic_write_file(path, lambda tmp: Path(tmp).write_bytes(b"2"))
    assert path.read_bytes() == b"2"
    with pytest.raises(U.OutputExistsError):
        U.atomic_write_file(path, b"3", overwrite=False)

    def half_then_full(tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        U.atomic_write_file(path, half_then_full)
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"2" and leftovers(path.parent) == []


def test_stale_leftovers_of_a_dead_writer_are_cleaned_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target = tmp_path / "out"
    with U.atomic_write_dir(target) as tmp:
        write_version(tmp, 1)
    (tmp_path / f".out.tmp-{pid}-abcd").mkdir()
    (tmp_path / f".out.tmp-{pid}-abcd" / "x").write_text("half")
    (tmp_path / f".report.json.tmp-{pid}-ef01").write_text("half")
    alive = tmp_path / f".out.tmp-{os.getpid()}-beef"  # a live writer's folder is never touched
    alive.mkdir()
    with U.atomic_write_dir(target, overwrite=True) as tmp:
        write_version(tmp, 2)
    U.atomic_write_file(tmp_path / "report.json", "{}")
    assert leftovers(tmp_path) == [alive.name]


def test_a_crash_between_the_two_renames_restores_the_old_version(tmp_path):
    """The old folder moved aside, the new one not yet in place, then SIGKILL: the next write puts the old
    one back before deciding anything (so a no-overwrite write is still refused)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target = tmp_path / "out"
    with U.atomic_write_dir(target) as tmp:
        write_version(tmp, 1)
    os.rename(target, tmp_path / f".out.old-{pid}-0a0b")
    with pytest.raises(U.OutputExistsError):
        with U.atomic_write_dir(target) as tmp:
            write_version(tmp, 2)
    assert assert_complete(target) == 1 and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- kill -9

KILL_WRITER = """
import importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("spp_utils", sys.argv[1])
U = importlib.util.module_from_spec(spec); spec.loader.exec_module(U)
target = Path(sys.argv[2])
version = 0
while True:
    version += 1
    with U.atomic_write_dir(target, overwrite=True) as tmp:
        for i in range(4):
            (tmp / f"part{i}.bin").write_bytes(bytes([version % 256]) * (1 << 16))
        (tmp / "manifest.json").write_text(json.dumps({"version": version, "files": 4}))
    if version == 1:
        print("ready", flush=True)
"""


def _kill_when_writing(command: list, delay: float, **popen) -> None:
    """Start a writer that prints "ready" and then writes in a loop; kill -9 it ``delay`` seconds later."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **popen)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.07, 0.15, 0.3])
def test_kill_9_mid_write_leaves_a_whole_version(tmp_path, delay):
    target = tmp_path / "out"
    _kill_when_writing([sys.executable, "-c", KILL_WRITER, str(UTILS), str(target)], delay)
    if not U.can_exchange():  # two renames: the killed writer may have left the old folder moved aside
        U.clean_stale(target)
    before = assert_complete(target)
    assert before >= 1
    with U.atomic_write_dir(target, overwrite=True) as tmp:
        write_version(tmp, 200)
    assert assert_complete(target) == 200
    assert leftovers(tmp_path) == [], "the next write must clean the killed writer's leftovers"


ADAPTER_WRITER = """
import copy, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from tests._pipeline_fixtures import pruned_tiny
from spp_peft import training as T
model, tokenizer, _ = pruned_tiny()
cfg = T.TrainConfig(r=4, alpha=8, progress=False)
peft_model = T.prepare_model(model, "spp", cfg)
step = 0
while True:
    step += 1
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "spp_B" in name:
                p.fill_(float(step))
    T.save_adapter(peft_model, sys.argv[2], "spp", cfg, lr=float(step))
    if step == 1:
        print("ready", flush=True)
"""


def test_kill_9_while_saving_a_real_adapter(tmp_path):
    """The reported case: kill -9 during `train`'s adapter save left a 0-byte adapter_config.json."""
    from safetensors.torch import load_file

    target = tmp_path / "adapter"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for delay in (0.05,):  # the loop does nothing but save: the kill lands inside one (more delays: above)
        _kill_when_writing([sys.executable, "-c", ADAPTER_WRITER, str(ROOT), str(target)], delay, env=env, cwd=ROOT)
        config = json.loads((target / "adapter_config.json").read_text())
        info = json.loads((target / T.METHOD_FILE).read_text())
        weights = load_file(str(target / "adapter_model.safetensors"))
        values = {float(t.flatten()[0]) for k, t in weights.items() if "spp_B" in k}
        assert config["peft_type"] == "SPP" and values == {info["lr"]}, "weights and training json of one save"
        assert (target / "README.md").read_text().count("## Training (spp-peft)") == 1
    # The last kill may have left a temporary folder: the next save cleans it.
    model, tokenizer, _ = pruned_tiny()
    T.save_adapter(T.prepare_model(model, "spp", T.TrainConfig(r=4, alpha=8)), target, "spp", T.TrainConfig(r=4), 1.0)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 384 KiB tmpfs (root only); skips where mounting is not allowed (the patched-writer tests cover it)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mount)],
                                          capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_leaves_the_old_folder(small_tmpfs):
    target = small_tmpfs / "out"
    with U.atomic_write_dir(target) as tmp:
        write_version(tmp, 1)  # 256 KiB of 384
    with pytest.raises(OSError) as err:
        with U.atomic_write_dir(target, overwrite=True) as tmp:
            write_version(tmp, 2)
    assert err.value.errno == errno.ENOSPC
    assert assert_complete(target) == 1 and leftovers(small_tmpfs) == []


def test_full_disk_leaves_the_old_report(small_tmpfs):
    from spp_peft import report as R

    results = {"name": "r", "perplexity": {"heldout": {"pruned": 10.0}}, "padding": "x" * 100_000}
    R.write_report(results, small_tmpfs, plots=False)
    before = (small_tmpfs / "report.json").read_text()
    (small_tmpfs / "ballast").write_bytes(b"\0" * (200 << 10))
    with pytest.raises(OSError):
        R.write_report(dict(results, padding="y" * 250_000), small_tmpfs, plots=False)  # no room even in place
    assert (small_tmpfs / "report.json").read_text() == before
    assert leftovers(small_tmpfs) == []


def _disk_full_after(n_bytes):
    def write(tmp, *args, **kwargs):
        Path(tmp, "README.md").write_bytes(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_full_disk_during_adapter_save_keeps_the_old_adapter(tmp_path, monkeypatch):
    model, tokenizer, _ = pruned_tiny()
    peft_model = T.prepare_model(model, "spp", T.TrainConfig(r=4, alpha=8))
    cfg = T.TrainConfig(r=4)
    folder = T.save_adapter(peft_model, tmp_path / "adapter", "spp", cfg, 1.0)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr("spp_peft.hub.write_training_card", lambda path, *a: _disk_full_after(100)(path.parent))
    with pytest.raises(OSError):
        T.save_adapter(peft_model, folder, "spp", cfg, 2.0)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_resaving_an_adapter_keeps_one_training_section(tmp_path):
    model, tokenizer, _ = pruned_tiny()
    peft_model = T.prepare_model(model, "spp", T.TrainConfig(r=4, alpha=8))
    for lr in (1.0, 2.0):
        folder = T.save_adapter(peft_model, tmp_path / "adapter", "spp", T.TrainConfig(r=4), lr)
    assert (folder / "README.md").read_text().count("## Training (spp-peft)") == 1


def test_full_disk_during_pruned_save_keeps_the_old_model(tmp_path, monkeypatch):
    from spp_peft.pruning import save_pruned

    model, tokenizer, result = pruned_tiny()
    out = save_pruned(model, tokenizer, tmp_path / "pruned", result)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(tokenizer, "save_pretrained", _disk_full_after(1000))
    with pytest.raises(OSError):
        save_pruned(model, tokenizer, out, result, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_a_checkpoint_cut_by_a_crash_is_removed_and_the_one_before_resumes(tmp_path):
    """The Trainer writes checkpoint-N in place, trainer_state.json last: without it, a crash cut the save."""
    ckpt = tmp_path / "checkpoints"
    for step, state in ((2, '{"global_step": 2}'), (4, None), (6, "")):
        (ckpt / f"checkpoint-{step}").mkdir(parents=True)
        (ckpt / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"")
        if state is not None:
            (ckpt / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert T._last_complete_checkpoint(ckpt).endswith("checkpoint-2")
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-2"]


def test_train_output_is_a_resume_only_with_the_same_settings(tmp_path):
    class Data:
        num_tokens = 100

        def __len__(self):
            return 4

    cfg, data = T.TrainConfig(r=4, lr=1e-3), {"source": "builtin"}
    T._prepare_checkpoints(tmp_path / "checkpoints", T._run_identity("spp", cfg, 1e-3, Data(), data), True)
    assert T.is_resume(tmp_path, "spp", cfg, data=data)
    assert T.is_resume(tmp_path, "spp", T.TrainConfig(r=4, lr=1e-3, progress=True, save_steps=5), data=data)
    assert not T.is_resume(tmp_path, "spp", T.TrainConfig(r=4, lr=2e-3), data=data)
    assert T.is_resume(tmp_path, "spp", T.TrainConfig(r=4, lr=1e-3, max_steps=9, epochs=5), data=data)  # budget
    assert not T.is_resume(tmp_path, "lora_star", cfg, data=data)
    assert not T.is_resume(tmp_path, "spp", T.TrainConfig(r=4, lr=1e-3, resume=False), data=data)
    assert not T.is_resume(tmp_path / "nothing", "spp", cfg, data=data)


# -------------------------------------------------------------------------------- concurrent writers


def test_two_threads_without_overwrite_exactly_one_wins(tmp_path, monkeypatch):
    """Both pass the early check (the barrier holds them at the rename); the lock lets exactly one in."""
    from spp_peft.pruning import save_pruned

    publish, barrier = U._publish, threading.Barrier(2, timeout=30)

    def racing_publish(*args, **kwargs):
        barrier.wait()
        return publish(*args, **kwargs)

    monkeypatch.setattr(U, "_publish", racing_publish)
    model, tokenizer, result = pruned_tiny()
    models = {"a": model, "b": copy.deepcopy(model)}
    models["b"].config.spp_writer = "b"
    models["a"].config.spp_writer = "a"
    outcome = {}

    def save(name):
        try:
            save_pruned(models[name], tokenizer, tmp_path / "same", result)
            outcome[name] = "saved"
        except FileExistsError as err:
            outcome[name] = err

    threads = [threading.Thread(target=save, args=(n,)) for n in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, o in outcome.items() if o == "saved"]
    assert len(winners) == 1, outcome
    loser = next(o for o in outcome.values() if o != "saved")
    assert isinstance(loser, U.OutputExistsError) and "same" in str(loser)
    assert json.loads((tmp_path / "same" / "config.json").read_text())["spp_writer"] == winners[0]
    assert leftovers(tmp_path) == []


RACER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("spp_utils", sys.argv[1])
U = importlib.util.module_from_spec(spec); spec.loader.exec_module(U)
go = Path(sys.argv[3])
try:
    with U.atomic_write_dir(Path(sys.argv[2])) as tmp:
        (tmp / "who").write_text(sys.argv[4])
        while not go.exists():
            time.sleep(0.005)
except FileExistsError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""


def test_two_processes_without_overwrite_exactly_one_wins(tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(UTILS), str(tmp_path / "same"), str(go), who],
                              stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    time.sleep(0.5)  # both inside the block: past the early check
    go.touch()
    codes = [p.wait(timeout=30) for p in procs]
    errors = [p.stderr.read() for p in procs]
    assert sorted(codes) == [0, 2], errors
    winner = "ab"[codes.index(0)]
    assert (tmp_path / "same" / "who").read_text() == winner
    assert "already exists" in errors[codes.index(2)]
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_dense(tmp_path_factory.mktemp("tiny"))


def _no_work(monkeypatch):
    """Loading a model is the first piece of work of every command: make it fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command started working before refusing its output folder")

    monkeypatch.setattr(P, "load", refuse)
    monkeypatch.setattr("spp_peft.models.load_model", refuse)


def _occupied(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mine.txt").write_text("the user's file")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("command", [
    ["prune", "--model", "{tiny}", "--method", "magnitude", "--pattern", "2:4"],
    ["train", "--model", "{tiny}", "--max-steps", "1"],
    ["merge", "--model", "{tiny}", "--adapter", "{tiny}"],
])
def test_cli_refuses_a_non_empty_output_before_any_work(command, tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    before = _occupied(out)
    if command[0] == "merge":
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
        command = [*command[:-1], str(tmp_path / "adapter")]
    _no_work(monkeypatch)
    argv = [a.replace("{tiny}", str(tiny_dir)) for a in command] + ["--output", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_prune_overwrite_replaces_and_empty_output_is_refused(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _occupied(out)
    argv = ["prune", "--model", str(tiny_dir), "--method", "magnitude", "--pattern", "2:4", "-q"]
    assert cli.main([*argv, "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert leftovers(tmp_path) == []
    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch)
    capsys.readouterr()
    assert cli.main([*argv, "--output", " "]) == 2
    assert "empty" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert cli.main([*argv, "--output", str(tmp_path / "a-file" / "sub")]) == 2
    assert "a-file is a file, not a folder" in capsys.readouterr().err


def _recipe(path: Path, tiny_dir, out, lr=1e-3) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "io", "output_dir": str(out), "model": {"name_or_path": str(tiny_dir)},
        "pruning": {"method": "magnitude", "pattern": "2:4"}, "data": {"cutoff_len": 32, "max_samples": 8},
        "train": {"methods": ["spp"], "max_steps": 1, "batch_size": 2, "r": 4, "progress": False, "lr": lr},
        "eval": {"seqlen": 32, "max_tokens": 64, "datasets": {"heldout": "builtin:heldout"}},
        "report": {"plots": False},
    }))
    return path


def test_run_refuses_a_folder_holding_another_run(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    first = load_recipe_file(_recipe(tmp_path / "a.yaml", tiny_dir, out))
    out.mkdir()
    (out / "recipe.yaml").write_text(first.to_yaml())
    (out / "pruned").mkdir()
    (out / "pruned" / "model.safetensors").write_bytes(b"the old base")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _no_work(monkeypatch)
    assert cli.main(["run", str(_recipe(tmp_path / "b.yaml", tiny_dir, out, lr=5e-2)), "-q"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # The same recipe again is a resume: allowed (checked here without running it); so is a larger budget.
    P.check_output_dir(first, overwrite=False)
    grown = copy.deepcopy(first)
    grown.train.max_steps, grown.train.epochs = 3, 5.0
    P.check_output_dir(grown, overwrite=False)
    with pytest.raises(FileExistsError):
        P.check_output_dir(load_recipe_file(tmp_path / "b.yaml"), overwrite=False)
    P.check_output_dir(load_recipe_file(tmp_path / "b.yaml"), overwrite=True)
    # --overwrite replaces the previous run as a whole (no old adapter beside a new base), not other files.
    (out / "spp" / "adapter").mkdir(parents=True)
    (out / "notes.txt").write_text("the user's notes")
    with P.claim_output_dir(load_recipe_file(tmp_path / "b.yaml"), overwrite=True):
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "recipe.yaml"]
    assert load_recipe_file(out / "recipe.yaml").train.lr == 5e-2
    # A folder with other files and no recipe.yaml is someone's else's: refused.
    (out / "recipe.yaml").unlink()
    with pytest.raises(FileExistsError):
        P.check_output_dir(first, overwrite=False)


def test_run_with_an_empty_output_dir_writes_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "recipe.yaml").write_text("the user's own file")
    monkeypatch.chdir(work)
    _no_work(monkeypatch)
    recipe = _recipe(tmp_path / "a.yaml", tiny_dir, "out")
    for flags in (["--set", "output_dir="], ["--set", "output_dir=  "], ["--output-dir", ""]):
        assert cli.main(["run", str(recipe), *flags, "-q"]) == 2
        assert "output_dir must not be empty" in capsys.readouterr().err
    assert cli.main(["run", str(recipe), "--set", "output_dir=recipe.yaml/run", "-q"]) == 2
    assert "recipe.yaml is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["recipe.yaml"]
    assert (work / "recipe.yaml").read_text() == "the user's own file"


def load_recipe_file(path):
    from spp_peft.recipe import load_recipe

    return load_recipe(path)


def test_cli_train_reruns_its_own_settings_and_refuses_others(tmp_path, capsys):
    from ._pipeline_fixtures import save_pruned_tiny

    pruned = save_pruned_tiny(tmp_path / "pruned")
    out = tmp_path / "run"
    argv = ["train", "--model", str(pruned), "--data", "builtin", "--cutoff-len", "32", "--max-samples", "4",
            "--max-steps", "1", "--batch-size", "2", "--r", "4", "--output", str(out), "-q"]
    assert cli.main([*argv, "--lr", "1e-3"]) == 0
    assert cli.main([*argv, "--lr", "1e-3"]) == 0, "the same settings again are a resume"
    adapter = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}
    capsys.readouterr()
    assert cli.main([*argv, "--lr", "5e-2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == adapter
    assert cli.main([*argv, "--lr", "5e-2", "--overwrite"]) == 0
    assert json.loads((out / "adapter" / T.METHOD_FILE).read_text())["lr"] == 5e-2
    assert leftovers(out) == [] and leftovers(out / "adapter") == []


def test_run_reruns_the_same_recipe(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "a.yaml", tiny_dir, out)
    assert cli.main(["run", str(recipe), "-q"]) == 0
    assert cli.main(["run", str(recipe), "-q", "--train.progress", "true"]) == 0, "same recipe: a resume"
    assert sorted(p.name for p in out.iterdir()) == ["merged", "pruned", "recipe.yaml", "report.json", "report.md",
                                                     "run.log", "spp"]
    assert leftovers(out) == [] and leftovers(out / "merged") == []


def test_a_second_job_on_a_busy_folder_fails_at_once(tmp_path, tiny_dir, monkeypatch, capsys):
    """A run or a training holds its folder: another one into it fails before any work, nothing mixed in."""
    out = tmp_path / "out"
    model, tokenizer, _ = pruned_tiny()
    with U.exclusive(out):
        with pytest.raises(U.OutputBusyError, match="being written by another process"):
            T.train(model, tokenizer, "spp", None, T.TrainConfig(), out)
        _no_work(monkeypatch)
        assert cli.main(["run", str(_recipe(tmp_path / "a.yaml", tiny_dir, out)), "-q"]) == 2
        assert "being written by another process" in capsys.readouterr().err
    assert not out.exists()

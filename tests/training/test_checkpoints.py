"""spp_peft.training.checkpoints: resume as HF users expect. A grown budget continues the run and keeps every
checkpoint; other settings are refused (nothing deleted) unless ``overwrite=True``; ``resume_from_checkpoint``
is True (the last checkpoint of the output folder) or the PATH of one."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from spp_peft import training as T
from spp_peft.errors import CheckpointMismatch

from .helpers import CFG

#: A schedule that does not depend on the total number of steps: only then is a run continued to a larger
#: budget the same as a run started with it (Trainer rebuilds linear/cosine schedules for the new total).
CONSTANT = dict(CFG, lr_scheduler="constant", save_steps=2, save_total_limit=10)


def _spp_b(model):
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "spp_B" in n])


def _run(pruned, dataset, out, cfg, **kwargs):
    base, tokenizer = pruned
    return T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, out, **kwargs)


def _fingerprints(ckpt_dir):
    """Each checkpoint's files and their hashes: what must survive a later run untouched."""
    return {p.relative_to(ckpt_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ckpt_dir.glob("checkpoint-*/*")) if p.is_file()}


def test_grown_budget_continues_keeps_checkpoints_and_equals_a_straight_run(pruned, dataset, tmp_path):
    four = _run(pruned, dataset, tmp_path / "a", T.TrainConfig(**CONSTANT, max_steps=4))
    ckpt = tmp_path / "a" / "checkpoints"
    before = _fingerprints(ckpt)
    assert {p.split("/")[0] for p in before} == {"checkpoint-2", "checkpoint-4"}
    six = T.TrainConfig(**CONSTANT, max_steps=6)
    assert T.is_resume(tmp_path / "a", "spp", six)
    grown = _run(pruned, dataset, tmp_path / "a", six)
    assert grown.resumed_from.endswith("checkpoint-4") and grown.steps == 6
    assert grown.losses[:4] == four.losses and len(grown.losses) == 6
    after = _fingerprints(ckpt)
    assert {k: v for k, v in after.items() if k in before} == before  # checkpoints 2 and 4 untouched
    assert any(k.startswith("checkpoint-6/") for k in after)
    straight = _run(pruned, dataset, tmp_path / "b", six)
    torch.testing.assert_close(_spp_b(grown.model), _spp_b(straight.model), rtol=1e-5, atol=1e-6)
    # Rerun with the same settings: the run is done, nothing trains again.
    again = _run(pruned, dataset, tmp_path / "a", six)
    assert again.resumed_from.endswith("checkpoint-6") and again.steps == 6 and again.losses == grown.losses
    # A budget below the last checkpoint is refused (checkpoint-6 is not thrown away for it).
    with pytest.raises(ValueError, match=r"checkpoint-6 is at step 6.*budget of 4 steps"):
        _run(pruned, dataset, tmp_path / "a", T.TrainConfig(**CONSTANT, max_steps=4))
    # ... unless the run resumes an earlier checkpoint, which ends it there.
    back = _run(pruned, dataset, tmp_path / "a", T.TrainConfig(**CONSTANT, max_steps=4),
                resume_from_checkpoint=str(ckpt / "checkpoint-4"))
    assert back.steps == 4 and back.losses == four.losses
    torch.testing.assert_close(_spp_b(back.model), _spp_b(four.model))
    assert _fingerprints(ckpt) == after


def test_other_settings_are_refused_without_overwrite_and_nothing_is_deleted(pruned, dataset, tmp_path):
    cfg = T.TrainConfig(**CONSTANT, max_steps=2)
    _run(pruned, dataset, tmp_path, cfg)
    before = _fingerprints(tmp_path / "checkpoints")
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    other = T.TrainConfig(**{**CONSTANT, "lr": 5e-2}, max_steps=2)
    assert not T.is_resume(tmp_path, "spp", other)
    with pytest.raises(CheckpointMismatch, match=r"other settings \(lr: 0\.01 -> 0\.05.*overwrite=True"):
        _run(pruned, dataset, tmp_path, other)
    assert _fingerprints(tmp_path / "checkpoints") == before
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    # Resuming switched off is no licence to delete either.
    with pytest.raises(CheckpointMismatch, match="resuming is off"):
        _run(pruned, dataset, tmp_path, T.TrainConfig(**CONSTANT, max_steps=2, resume=False))
    assert _fingerprints(tmp_path / "checkpoints") == before
    # overwrite=True: the old checkpoints go, the new run starts afresh.
    fresh = _run(pruned, dataset, tmp_path, other, overwrite=True)
    assert fresh.resumed_from is None and fresh.steps == 2
    assert _fingerprints(tmp_path / "checkpoints") != before
    # ... and overwrite does not stop a run of the same settings from resuming.
    same = _run(pruned, dataset, tmp_path, other, overwrite=True)
    assert same.resumed_from.endswith("checkpoint-2") and same.losses == fresh.losses


def test_resume_from_checkpoint_true_and_path(pruned, dataset, tmp_path):
    cfg = T.TrainConfig(**CONSTANT, max_steps=6)
    full = _run(pruned, dataset, tmp_path / "a", cfg)
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-4"
    # PATH: continue another folder's checkpoint into a new output folder, to the same adapter.
    continued = _run(pruned, dataset, tmp_path / "c", cfg, resume_from_checkpoint=str(checkpoint))
    assert continued.resumed_from == str(checkpoint) and continued.steps == 6
    assert continued.losses == full.losses
    torch.testing.assert_close(_spp_b(continued.model), _spp_b(full.model), rtol=1e-5, atol=1e-6)
    # True: the last checkpoint of the output folder, even with train.resume off; there must be one.
    off = T.TrainConfig(**CONSTANT, max_steps=6, resume=False)
    assert T.is_resume(tmp_path / "a", "spp", off, resume_from_checkpoint=True)
    done = _run(pruned, dataset, tmp_path / "a", off, resume_from_checkpoint=True)
    assert done.resumed_from.endswith("checkpoint-6") and done.steps == 6
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        _run(pruned, dataset, tmp_path / "empty", cfg, resume_from_checkpoint=True)
    with pytest.raises(FileNotFoundError, match="checkpoint-99"):
        _run(pruned, dataset, tmp_path / "d", cfg, resume_from_checkpoint=str(checkpoint.parent / "checkpoint-99"))
    # A checkpoint of other settings is refused, whatever overwrite says.
    other = T.TrainConfig(**{**CONSTANT, "r": 2}, max_steps=6)
    with pytest.raises(ValueError, match=r"other settings \(train\.r: 4 -> 2"):
        _run(pruned, dataset, tmp_path / "e", other, resume_from_checkpoint=str(checkpoint), overwrite=True)
    assert not (tmp_path / "e" / "adapter").exists()


def test_grown_epochs_continue_from_the_last_checkpoint(pruned, tmp_path):
    small = T.build_dataset(pruned[1], T.DataConfig(cutoff_len=32, max_samples=4))  # 2 steps per epoch
    one = _run(pruned, small, tmp_path, T.TrainConfig(**CONSTANT, epochs=1))
    assert one.steps == 2
    two = _run(pruned, small, tmp_path, T.TrainConfig(**CONSTANT, epochs=2))
    assert two.resumed_from.endswith("checkpoint-2") and two.steps == 4 and two.losses[:2] == one.losses
    again = _run(pruned, small, tmp_path, T.TrainConfig(**CONSTANT, epochs=2))
    assert again.resumed_from.endswith("checkpoint-4") and again.losses == two.losses

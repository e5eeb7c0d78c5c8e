"""spp_peft.training.trainer: the Trainer glue, divergence, checkpoints and resume, instruction data."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from spp_peft import training as T

from .helpers import CFG


class _StopAt:
    """A TrainerCallback that interrupts training after ``step`` steps (a crash, for the resume test)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True
                return control

        return Stop()


def _spp_b(model):
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "spp_B" in n])


def test_diverged_training_stops_early_and_saves_nothing(pruned, dataset, tmp_path):
    from spp_peft.errors import TrainingDiverged

    base, tokenizer = pruned
    cfg = T.TrainConfig(**dict(CFG, lr=1e30), max_steps=40)
    with pytest.raises(TrainingDiverged, match=r"non-finite adapter weights .* by step (\d|1\d) with lr=1e\+30"):
        T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, tmp_path)
    assert not (tmp_path / "adapter").exists()


def test_train_saves_adapter_and_resume_equals_uninterrupted(pruned, dataset, tmp_path):
    base, tokenizer = pruned
    cfg = T.TrainConfig(**CFG, max_steps=6, save_steps=2)
    # Uninterrupted run.
    full = T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, tmp_path / "a")
    assert full.steps == 6 and len(full.losses) == 6
    assert full.losses[-1][1] < full.losses[0][1] + 1.0
    adapter = tmp_path / "a" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    info = json.loads((adapter / T.METHOD_FILE).read_text())
    assert info["method"] == "spp" and info["result"]["steps"] == 6
    card = (adapter / "README.md").read_text()
    assert "SPP adapter" in card and "Training (spp-peft)" in card
    # Interrupted after 4 steps, then resumed: same adapter as the uninterrupted run.
    first = T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg,
                    tmp_path / "b", callbacks=[_StopAt(4)])
    assert first.steps == 4 and first.resumed_from is None
    resumed = T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, tmp_path / "b")
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-4")
    assert resumed.steps == 6
    torch.testing.assert_close(_spp_b(resumed.model), _spp_b(full.model), rtol=1e-5, atol=1e-6)
    assert resumed.losses[:4] == first.losses
    # A finished run resumes from its last checkpoint without training again, to the same adapter.
    again = T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, tmp_path / "a")
    assert again.resumed_from.endswith("checkpoint-6") and again.steps == 6 and again.losses == full.losses
    torch.testing.assert_close(_spp_b(again.model), _spp_b(full.model))


def test_changed_settings_do_not_resume_old_checkpoints(pruned, dataset, tmp_path):
    base, tokenizer = pruned
    cfg = T.TrainConfig(**CFG, max_steps=2, save_steps=2)
    T.train(T.prepare_model(copy.deepcopy(base), "spp", cfg), tokenizer, "spp", dataset, cfg, tmp_path)
    other = T.TrainConfig(**{**CFG, "lr": 5e-2}, max_steps=2, save_steps=2)
    # Refused without overwrite (tests/training/test_checkpoints.py); with it, a fresh start.
    again = T.train(T.prepare_model(copy.deepcopy(base), "spp", other), tokenizer, "spp", dataset, other, tmp_path,
                    lr=5e-2, overwrite=True)
    assert again.resumed_from is None and again.steps == 2


def test_gradient_checkpointing_trains_the_same(pruned, dataset, tmp_path):
    base, tokenizer = pruned
    runs = []
    for i, gc in enumerate((False, True)):
        cfg = T.TrainConfig(**CFG, max_steps=2, gradient_checkpointing=gc)
        model = T.prepare_model(copy.deepcopy(base), "spp", cfg)
        model.train()
        runs.append(T.train(model, tokenizer, "spp", dataset, cfg, tmp_path / str(i)))
        assert model.base_model.model.is_activation_checkpointing is gc
    torch.testing.assert_close(_spp_b(runs[0].model), _spp_b(runs[1].model), rtol=1e-4, atol=1e-6)


def test_instruction_dataset_trains(pruned, tmp_path):
    base, tokenizer = pruned
    records = tmp_path / "data.jsonl"
    records.write_text("\n".join(json.dumps({"instruction": f"Count to {i}.", "input": "",
                                             "output": " ".join(str(j) for j in range(i))}) for i in range(2, 10)))
    ds = T.build_dataset(tokenizer, T.DataConfig(source=str(records), format="alpaca", cutoff_len=256,
                                                 train_on_inputs=False))
    assert len(ds) == 8
    cfg = T.TrainConfig(**CFG, max_steps=2)
    result = T.train(T.prepare_model(copy.deepcopy(base), "masked_lora", cfg), tokenizer, "masked_lora", ds, cfg,
                     tmp_path / "run")
    assert result.steps == 2 and all(loss == loss for _, loss in result.losses)  # finite, padded batches work

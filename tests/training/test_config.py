"""spp_peft.training.config: settings no training could use are refused when the config is built."""

from __future__ import annotations

import pytest

from spp_peft import training as T


def test_config_validation():
    with pytest.raises(ValueError, match="lr"):
        T.TrainConfig(lr=0).validate()
    with pytest.raises(ValueError, match="format"):
        T.DataConfig(format="sharegpt").validate()
    # NaN and inf pass `x > 0`; they must not reach the Trainer (an all-NaN adapter would be saved).
    for bad in (dict(lr=float("inf")), dict(lr=float("nan")), dict(alpha=float("nan")), dict(alpha=1e40),
                dict(epochs=float("inf"), max_steps=-1), dict(warmup=float("inf")), dict(weight_decay=float("nan"))):
        with pytest.raises(ValueError, match="finite"):
            T.TrainConfig(**bad).validate()
    # What TrainingArguments would refuse only when the Trainer is built (after pruning), refused up front.
    with pytest.raises(ValueError, match="train.optim: unknown value 'bogus'; choose one of adamw_torch"):
        T.TrainConfig(optim="bogus").validate()
    with pytest.raises(ValueError, match="train.lr_scheduler: unknown value 'bogus'; choose one of linear"):
        T.TrainConfig(lr_scheduler="bogus").validate()


def test_bad_settings_are_refused_when_built_and_validate_stays_callable():
    with pytest.raises(ValueError, match="train.r must be >= 1"):
        T.TrainConfig(r=0)
    with pytest.raises(ValueError, match="data.cutoff_len"):
        T.DataConfig(cutoff_len=1)
    cfg = T.TrainConfig()
    assert cfg.scaling == 2.0
    cfg.lr = float("nan")  # edited after construction: validate() catches it again
    with pytest.raises(ValueError, match="train.lr"):
        cfg.validate()


def test_config_module_is_light():
    """The recipe builds its schema from these dataclasses: importing and building them loads neither
    transformers nor peft nor the trainer."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from spp_peft.training import DataConfig, TrainConfig; DataConfig(); TrainConfig(); "
            "print(sorted(m for m in ('transformers', 'peft', 'spp_peft.training.trainer') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"

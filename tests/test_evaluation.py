"""Perplexity (WikiText-2 protocol) against a direct computation with the model's own loss."""

from __future__ import annotations

import math

import pytest
import torch

from spp_peft.data import builtin_text, token_stream
from spp_peft.evaluation import perplexity
from spp_peft.testing import byte_tokenizer, tiny_llama


def test_perplexity_matches_the_models_own_loss():
    model, tok = tiny_llama(), byte_tokenizer()
    texts = builtin_text("heldout")[:3]
    stream = token_stream(tok, texts)[:1000]
    windows = stream[: (1000 // 64) * 64].reshape(-1, 64)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    expected = math.exp(sum(losses) / len(losses))  # equal windows: mean of means == mean over tokens
    got = perplexity(model, stream, seqlen=64, batch_size=5, show_progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, windows, batch_size=3, show_progress=False) == pytest.approx(got, rel=1e-6)
    full = perplexity(model, tok, texts=texts, seqlen=64, max_tokens=1000, show_progress=False)
    assert full == pytest.approx(got, rel=1e-6)


def test_perplexity_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="pass texts="):
        perplexity(model, byte_tokenizer())
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, torch.arange(10), seqlen=64)


# ------------------------------------------------------------------------- lm-eval, on a local task

TINY_TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tiny_task(folder):
    """A 6-question multiple-choice lm-eval task read from a local JSONL file (no network)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"{a} plus {b}", "choices": [str(a + b), str(a + b + 1)], "label": 0}
            for a, b in [(1, 2), (2, 2), (3, 4), (5, 1), (6, 2), (7, 1)]]
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = folder / "tiny_mc.yaml"
    yaml.write_text(TINY_TASK.format(data=data))
    return yaml


def test_zero_shot_on_a_local_task_file_reports_lm_evals_task_name(tmp_path):
    pytest.importorskip("lm_eval")
    from spp_peft.evaluation import zero_shot

    task = write_tiny_task(tmp_path / "tasks")
    scores = zero_shot(tiny_llama(), byte_tokenizer(), [str(task)], include_defaults=False, batch_size=2)
    assert list(scores) == ["tiny_mc"] and 0.0 <= scores["tiny_mc"] <= 1.0
    by_name = zero_shot(tiny_llama(), byte_tokenizer(), ["tiny_mc"], include_path=str(tmp_path / "tasks"),
                        include_defaults=False, batch_size=2)
    assert by_name == scores


def test_zero_shot_unknown_task_is_a_clear_error(tmp_path):
    pytest.importorskip("lm_eval")
    from spp_peft.evaluation import zero_shot

    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\): 'no_such_task'.*include_path"):
        zero_shot(tiny_llama(), byte_tokenizer(), ["no_such_task"], include_path=str(tmp_path),
                  include_defaults=False)

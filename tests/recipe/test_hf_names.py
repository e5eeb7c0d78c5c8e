"""The recipe speaks transformers' language: TrainingArguments names for the train keys (the short names stay
as aliases), and ``train.args`` passes any other TrainingArguments field through, checked before any work."""

from __future__ import annotations

import pytest

from spp_peft.recipe import RecipeError, load_recipe

HF = ("train:\n  learning_rate: 2e-2\n  per_device_train_batch_size: 2\n  gradient_accumulation_steps: 3\n"
      "  num_train_epochs: 1\n  warmup_steps: 0.1\n  lr_scheduler_type: cosine\n")
SHORT = "train:\n  lr: 2e-2\n  batch_size: 2\n  grad_accum: 3\n  epochs: 1\n  warmup: 0.1\n  lr_scheduler: cosine\n"


def test_hf_names_and_short_aliases_load_the_same_config():
    hf, short = load_recipe(HF, check_paths=False), load_recipe(SHORT, check_paths=False)
    assert hf == short and hf.train.lr == 2e-2 and hf.train.grad_accum == 3
    by_flag = load_recipe(None, ["train.learning_rate=2e-2", "train.per_device_train_batch_size=2"], check_paths=False)
    assert by_flag.train.lr == 2e-2 and by_flag.train.batch_size == 2


def test_a_setting_given_twice_is_refused():
    with pytest.raises(RecipeError, match="train.learning_rate and train.lr name the same setting"):
        load_recipe("train:\n  lr: 1e-2\n  learning_rate: 2e-2\n", check_paths=False)
    with pytest.raises(RecipeError, match="train.run_name and train.args.run_name name the same setting"):
        load_recipe("train:\n  run_name: a\n  args: {run_name: b}\n", check_paths=False)


def test_train_args_reach_training_arguments(tmp_path):
    from spp_peft.training.arguments import training_arguments

    recipe = load_recipe("train:\n  args:\n    label_smoothing_factor: 0.1\n    run_name: x\n"
                         "  adam_beta2: 0.99\n", check_paths=False)
    assert recipe.train.args == {"label_smoothing_factor": 0.1, "run_name": "x", "adam_beta2": 0.99}
    args = training_arguments(recipe.train.train_config(), tmp_path)
    assert args.label_smoothing_factor == 0.1 and args.run_name == "x" and args.adam_beta2 == 0.99
    assert args.report_to in ("none", [], ["none"])  # the default stays off ...
    args = training_arguments(load_recipe("train:\n  args: {report_to: [tensorboard]}\n", check_paths=False)
                              .train.train_config(), tmp_path)
    assert args.report_to == ["tensorboard"]  # ... and is settable


@pytest.mark.parametrize("text, needle", [
    ("train:\n  args: {lable_smoothing_factor: 0.1}\n",
     "unknown key train.args.lable_smoothing_factor; did you mean 'label_smoothing_factor'"),
    ("train:\n  lable_smoothing_factor: 0.1\n", "unknown key train.lable_smoothing_factor; did you mean 'label_smoothing_factor'"),
    ("train:\n  lerning_rate: 0.1\n", "did you mean 'learning_rate'"),
    ("train:\n  args: {label_smoothing_factor: abc}\n", "train.args.label_smoothing_factor: expected float"),
    ("train:\n  args: {learning_rate: 0.1}\n", "train.args.learning_rate: set train.learning_rate instead"),
    ("train:\n  args: {output_dir: /tmp/x}\n", "train.args.output_dir"),
    ("train:\n  args: {eval_strategy: sometimes}\n", "train.args"),
])
def test_unknown_or_bad_args_are_refused_with_a_suggestion(text, needle):
    with pytest.raises(RecipeError) as info:
        load_recipe(text, check_paths=False)
    assert needle in str(info.value) and "\n" not in str(info.value)

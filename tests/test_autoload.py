"""The opt-in start-up hook: with it, tools that never import spp_peft load SPP adapters; without PEFT in use,
it imports nothing heavy; a broken install costs one warning, never the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peft import get_peft_model

from spp_peft import SPPConfig, autoload
from spp_peft.testing import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, site_dir: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    """A fresh interpreter that processes ``site_dir``'s .pth files, as site-packages would at start-up."""
    prelude = f"import site; site.addsitedir({str(site_dir)!r})\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in (extra_path, str(ROOT)) if p))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=site_dir.parent, timeout=300)


def test_enable_status_disable(tmp_path):
    assert "disabled" in autoload.status(tmp_path)
    path = autoload.enable(tmp_path)
    assert path == tmp_path / autoload.PTH_NAME and path.read_text() == autoload.PTH_LINE
    autoload.enable(tmp_path)  # idempotent
    assert "enabled" in autoload.status(tmp_path) and len(list(tmp_path.iterdir())) == 1
    assert autoload.disable(tmp_path) and not autoload.disable(tmp_path)
    assert "disabled" in autoload.status(tmp_path)


def test_start_up_imports_nothing_heavy_and_probes_import_nothing(tmp_path):
    autoload.enable(tmp_path)
    out = _python(
        """
        import sys, importlib.util
        assert importlib.util.find_spec("peft") is not None
        print(sorted(m for m in ("torch", "peft", "transformers", "spp_peft.tuner") if m in sys.modules))
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]" and out.stderr == ""


def test_tools_that_never_import_spp_peft_load_an_spp_adapter(tmp_path):
    base = tiny_llama(num_layers=1)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, SPPConfig(target_modules=["q_proj", "v_proj"], r=4, init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    code = f"""
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
        print(type(PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).base_model).__name__)
        print(type(AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r}).base_model).__name__)
    """
    autoload.enable(tmp_path / "site")
    with_hook = _python(code, tmp_path / "site")
    assert with_hook.returncode == 0, with_hook.stderr[-2000:]
    assert with_hook.stdout.split() == ["SPPModel", "SPPModel"]


def test_a_broken_install_is_one_warning(tmp_path):
    autoload.enable(tmp_path / "site")
    broken = tmp_path / "broken" / "spp_peft"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('half-installed')\n")
    out = _python("print('still running')", tmp_path / "site", extra_path=str(tmp_path / "broken"))
    assert out.returncode == 0 and out.stdout.strip() == "still running"
    assert "spp-peft autoload: half-installed" in out.stderr and "Traceback" not in out.stderr


def test_pth_line_is_a_single_import_line():
    assert autoload.PTH_LINE.startswith("import ") and autoload.PTH_LINE.count("\n") == 1


@pytest.mark.slow  # lm-eval's CLI indexes its whole task zoo at start (tens of seconds)
def test_lm_eval_cli_with_peft_loads_an_spp_adapter(tmp_path):
    """The unchanged lm-eval command (`lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER`) on a local
    task evaluates an SPP adapter with the hook (without it: `KeyError: 'SPP'`, shown for PEFT's loaders in
    test_tools_that_never_import_spp_peft_load_an_spp_adapter)."""
    pytest.importorskip("lm_eval")
    from spp_peft.testing import byte_tokenizer

    from .test_evaluation import write_tiny_task

    base = tiny_llama(num_layers=1)
    base.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    model = get_peft_model(base, SPPConfig(target_modules=["q_proj", "v_proj"], r=4, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    task = write_tiny_task(tmp_path / "tasks")
    argv = ["lm_eval", "--model", "hf", "--model_args",
            f"pretrained={tmp_path / 'base'},peft={tmp_path / 'adapter'}", "--device", "cpu", "--tasks", "tiny_mc",
            "--include_path", str(task.parent), "--batch_size", "2", "--output_path", str(tmp_path / "out")]
    code = f"import sys; sys.argv = {argv!r}\nfrom lm_eval.__main__ import cli_evaluate\ncli_evaluate()\n"
    autoload.enable(tmp_path / "site")
    with_hook = _python(code, tmp_path / "site")
    assert with_hook.returncode == 0, with_hook.stderr[-3000:]
    assert "tiny_mc" in with_hook.stdout and "acc" in with_hook.stdout

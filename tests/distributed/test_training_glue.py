"""spp_peft.training.train (the pipeline's train stage) under a 2-process torchrun launch on CPU: one world
of 2, rank 0 alone takes the folder's lock and writes the adapter (other ranks used to stop at the lock)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch.distributed as dist

from spp_peft.testing import finish, free_port, torchrun_command

from .test_distributed import ROOT, _env

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")


def test_train_stage_under_torchrun_writes_once(tmp_path):
    script = Path(__file__).with_name("train_glue.py")
    proc = subprocess.Popen(torchrun_command(str(script), 2, [tmp_path / "out"], port=free_port()), cwd=str(ROOT),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = finish(proc, "2-process train stage")
    lines = sorted(line for line in out.splitlines() if line.startswith("RANK"))
    assert lines == [f"RANK 0 world 2 steps 3 adapter {tmp_path / 'out' / 'adapter'}",
                     "RANK 1 world 2 steps 3 adapter None"]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()

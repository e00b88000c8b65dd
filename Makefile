# The commands the README shows. `make run` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test run serve-dev cluster test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# requirements.txt pins every package (also as constraints for the test extras).
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.txt
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -c requirements.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test
	bash scripts/install-system-deps.sh

run: install
	$(BIN)/speech2image serve

serve-dev: install
	$(BIN)/python run.py

# The distributed stack on this machine (README "Scaling out"); CLUSTER_ARGS= for your models.
CLUSTER_ARGS ?= --tiny
cluster: install-test
	$(BIN)/speech2image cluster $(CLUSTER_ARGS)

test: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -n 2 --dist loadfile

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install-test
	$(BIN)/python bench/transcribe.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/translate.py
	$(BIN)/python bench/distributed.py
	$(BIN)/python bench/families.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

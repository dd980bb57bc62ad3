# The two set-up commands: `make demo` and `make test`. Each creates .venv when
# it is missing (or pyproject.toml changed) and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/unet-pipeline run

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf unet-work .pytest_cache

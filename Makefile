# Two commands on a fresh machine:
#   make train DATA=path/to/dataset   # virtual environment + train + evaluate, outputs in output/
#   make test                         # virtual environment + the test suite
PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/datasets/faces-dev
OUT ?= output
ARGS ?=

BIN := $(VENV)/bin

.PHONY: venv train evaluate test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

train: venv
	$(BIN)/facegender train --data $(DATA) --out $(OUT) $(ARGS)
	$(BIN)/facegender evaluate --model $(OUT)/best_model.pth --data $(DATA)/test --quiet

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache

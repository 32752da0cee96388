# Fresh machine: `make demo` or `make test`; both run `make setup` first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= ../shared/data

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system demo test clean

setup: system $(STAMP)

# Real servers the tests start on loopback ports: Redis (the services' multi-process bus).
system:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

# torch first, pinned: pip then takes the local CPU wheel instead of GBs of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The paper's setting on banking77: 1,000 labels, 10 cycles of 32 samples, patience 5.
demo: setup
	$(BIN)/pgkd distill --data $(DATA)/banking77 --labeled 1000 --teacher pool-guided --student minilm \
	  --samples-per-cycle 32 --max-cycles 10 --patience 5 --seed 1 --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

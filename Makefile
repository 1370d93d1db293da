# Every target installs what it needs first (scripts/setup.sh is a no-op once done).
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/arith_smollm2_cpu.yaml
PYTEST_ARGS ?=
# test processes (pytest-xdist, one test file per process at a time, heaviest first by
# tests/durations.json; tests marked serial run alone): 2 keeps a 2-core machine busy while
# one test waits on Ray or a subprocess; 0 = one
PYTEST_WORKERS ?= 2

.PHONY: setup protos train test lint bench clean

setup:
	@bash scripts/setup.sh

protos: setup
	@$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto

train: setup protos
	$(VENV)/bin/shuffle-r1 train --config $(CONFIG) $(ARGS)

test: setup protos
	@$(PY) scripts/ensure_redis.py
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Benchmarks (bench/, README "Benchmarks"): BENCHES picks them, default the system ones;
# BENCHES=algorithms runs the ~100 min GRPO / GRPO+PTS / Shuffle-R1 sweep. TRL (the peer of
# bench/throughput.py) installs here, held to the runtime's pins.
BENCHES ?=
bench: setup protos
	@grep -vE '^\s*(#|$$)' requirements/pins.txt | sed 's/\[[^]]*\]//' > $(VENV)/bench-constraints.txt
	@$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/bench-constraints.txt -r requirements/bench.txt
	@$(PY) scripts/ensure_redis.py
	PY=$(PY) bash bench/run_all.sh $(BENCHES)

lint: setup protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy shuffle_r1 actors services

clean:
	rm -rf $(VENV) protos/*_pb2*.py protos/*_pb2.pyi .pytest_cache .hypothesis

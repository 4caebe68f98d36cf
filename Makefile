# SplitServe: every install and run step lives here or in scripts/.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m

.PHONY: setup run demo test test-fast lint protos bench-offline clean

setup:
	bash scripts/setup.sh

## The main job: the local service on the default model (see README).
run: setup
	$(PY) -m splitserve.cli serve --model $(MODEL) --prefill-workers 1 --decode-workers 1 --demo

## Everything the tests need, then the whole suite (CPU only; gpu-marked tests skip).
test: setup
	bash scripts/run_tests.sh

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow" tests

TORCH_FREE_CORE := engine/block_manager.py engine/scheduler.py engine/sequence.py \
	engine/sampling_params.py engine/block_hash.py engine/stop_checker.py engine/tokenizer.py \
	cluster router splitserve/client.py splitserve/_client_common.py splitserve/protocol.py

lint: setup
	$(VENV)/bin/ruff check engine kernels kvtransfer cluster router splitserve prefill_worker decode_worker tests benchmarks scripts
	$(VENV)/bin/mypy $(TORCH_FREE_CORE)

protos:
	$(PY) scripts/gen_protos.py

bench-offline: setup
	$(PY) -m splitserve.cli bench offline --model $(MODEL)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

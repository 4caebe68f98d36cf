# SplitServe: every install and run step lives here or in scripts/.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= smollm2-135m
# Extra flags for `make run`, e.g. RUN_ARGS=--exit-after-demo (demo, then stop).
RUN_ARGS ?=

.PHONY: setup run test test-fast lint lock protos bench-offline fresh-check clean

setup:
	bash scripts/setup.sh

## The main job: the local service on the default model (see README).
run: setup
	$(PY) -m splitserve.cli serve --model $(MODEL) --prefill-workers 1 --decode-workers 1 --demo $(RUN_ARGS)

## Everything the tests need, then the whole suite (CPU only; gpu-marked tests skip).
test: setup
	bash scripts/run_tests.sh

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow" tests

# mypy: the whole package (the engine, kernels and entry points included).
MYPY_PACKAGES := -p splitserve

lint: setup
	$(VENV)/bin/ruff check splitserve kernels kvtransfer router prefill_worker decode_worker \
		tests benchmarks scripts setup.py
	$(VENV)/bin/mypy $(MYPY_PACKAGES)

## Refresh requirements/dev.lock to the newest releases within pyproject.toml's ranges.
lock: setup
	$(VENV)/bin/pip-compile -q --upgrade --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links --extra dev --extra triton -o requirements/dev.lock \
		pyproject.toml requirements/pins.in
	# The CPU wheel's local label (+cpu) names no public index: keep the plain version.
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' requirements/dev.lock

protos:
	$(PY) scripts/gen_protos.py

bench-offline: setup
	$(PY) -m splitserve.cli bench offline --model $(MODEL)

## Proof on a fresh machine: clone, new venv, empty pip cache, the README's two commands.
fresh-check:
	bash scripts/fresh_machine_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache kernels/*.so router/*.so splitserve/cluster/*.so

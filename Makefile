# VIMS front door. `make demo` and `make test` each do all set-up first.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint unit bench clean

setup:
	@bash scripts/setup.sh all

demo: setup
	$(VENV)/bin/vims demo

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	bash scripts/ansible-checks.sh lint

unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)
	bash scripts/ansible-checks.sh units

test: lint
	@bash scripts/run-tests.sh $(PYTEST_ARGS)

bench: setup
	$(PY) bench/lab_boot.py
	$(PY) bench/check_round.py

clean:
	-$(VENV)/bin/vims lab down --all
	rm -rf $(VENV) .venv-ctl .mypy_cache .pytest_cache .ruff_cache

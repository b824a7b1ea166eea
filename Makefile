# VIMS front door. `make demo` and `make test` each do all set-up first.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo demo-runtime test test-xen lint unit bench clean

setup:
	@bash scripts/setup.sh all

# The main job: VIMS rolled out with Ansible (playbooks/site.yml) on the one-machine
# lab, a rootkit, and the verdicts (scripts/lab-demo.sh).
demo: setup
	bash scripts/lab-demo.sh

# The runtime alone: introspection, the rootkit's findings, the gate (vims demo).
demo-runtime: setup
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

# The nested Xen lab's tests alone (`make test` runs them too; VIMS_XEN_TESTS=0 leaves
# them and the xen Molecule scenario out of it). See docs/xen-lab.md.
test-xen: setup
	$(PY) -m pytest -q tests/integration/test_xen_lab.py $(PYTEST_ARGS)

bench: setup
	$(PY) bench/lab_boot.py
	$(PY) bench/check_round.py
	$(PY) bench/churn_rounds.py --rounds 1000
	$(PY) bench/rems_load.py --n 10,100,1000 --duration 10 --quote-every 10
	$(PY) bench/rems_hostile.py
	$(PY) bench/guest_overhead.py

clean:
	-$(VENV)/bin/vims lab down --all
	-PATH=$(CURDIR)/.venv-ctl/bin:$$PATH ansible-playbook playbooks/lab-down.yml -e lab_down_purge=true
	rm -rf $(VENV) .venv-ctl .mypy_cache .pytest_cache .ruff_cache

# The two commands a newcomer runs (README): `sudo make demo` and `sudo make test`.
# VENV: the virtual environment (the Vagrant VM sets it in /etc/testbed.env).
VENV ?= .venv
-include /etc/testbed.env
export TESTBED_VENV := $(VENV)

.PHONY: setup test demo bench clean

setup:
	bash scripts/setup.sh

test: setup
	bash scripts/test.sh

demo: setup
	$(VENV)/bin/testbed run experiments/ipvs_vs_iptables.yaml --profile quick

bench: setup
	$(VENV)/bin/python benchmarks/bench_fabric.py

clean:
	-$(VENV)/bin/testbed clean

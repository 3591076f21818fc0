# The two commands a newcomer runs (README): `sudo make demo` and `sudo make test`.
.PHONY: setup test test-quick demo bench clean

setup:
	bash scripts/setup.sh

test: setup
	bash scripts/test.sh

demo: setup
	.venv/bin/testbed up topologies/seed.yaml
	.venv/bin/testbed status
	.venv/bin/testbed down

bench: setup
	.venv/bin/python benchmarks/bench_fabric.py

clean:
	-.venv/bin/testbed clean

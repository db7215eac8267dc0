# mailwarden: developer shortcuts.
#   make bench                     the full benchmark matrix (bench/README.md, ~20 min)
#   make bench BENCH_ARGS=--quick  the quick one (~2 min)

PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
BENCH_ARGS ?=

.PHONY: bench
bench:
	$(PYTHON) bench/run.py $(BENCH_ARGS)

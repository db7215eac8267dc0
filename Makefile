# mailwarden: developer shortcuts.
#   make bench                     the full benchmark matrix (bench/README.md, ~20 min)
#   make bench BENCH_ARGS=--quick  the quick one (~2 min)
#   make bench-latency             added p50 latency at 1 session (bench/latency.py, ~1 min)
#   make bench-memory              peak RSS: 50-session soak + one 50 MB message (bench/memory.py, ~2 min)
#   make bench-memory MEMORY_ARGS='--seconds 20'   (LATENCY_ARGS likewise)

PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
BENCH_ARGS ?=
LATENCY_ARGS ?=
MEMORY_ARGS ?=

.PHONY: bench bench-latency bench-memory
bench:
	$(PYTHON) bench/run.py $(BENCH_ARGS)

bench-latency:
	$(PYTHON) bench/latency.py $(LATENCY_ARGS)

bench-memory:
	$(PYTHON) bench/memory.py $(MEMORY_ARGS)

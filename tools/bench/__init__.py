"""Benchmarks: each prints a table and writes JSON (and plots) under build/bench/; speed and memory targets
live here, not in tests. Run one with `python -m tools.bench.NAME --help`."""

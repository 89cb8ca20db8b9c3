"""Command line, demo and benchmarks. Imports mcu, tee and edge; nothing imports tools."""

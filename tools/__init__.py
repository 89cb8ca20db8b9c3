"""The command line (`tinyshield JOB ...`), the demo and the benchmarks: they parse arguments, call the
packages and print. Work that a second caller could want belongs in a package, not here.

`tools` imports `base`, `edge`, `mcu` and `tee`; nothing imports `tools`.
"""

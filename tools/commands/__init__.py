"""One module per job. Each defines `register(subparsers)`; the CLI discovers them all.

Handlers import heavy packages (torch, the interpreters) lazily so `tinyshield --help` stays fast.
"""

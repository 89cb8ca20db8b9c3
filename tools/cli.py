"""`tinyshield` command line: discovers the jobs in tools/commands/ and runs one."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from edge.errors import TinyshieldError

import tools.commands


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinyshield",
        description="Deploy tiny transformers where memory is scarce and hardware is not trusted.")
    sub = p.add_subparsers(dest="command", metavar="JOB")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(tools.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"tools.commands.{info.name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TinyshieldError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

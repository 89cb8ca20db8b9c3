"""`tinyshield` command line: discovers the jobs in tools/commands/ and runs one."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from base.errors import InternalError, TinyshieldError

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
    p = parser()
    args, extra = p.parse_known_args(argv)
    # argparse stops filling a trailing INPUT... list at the first option: collect inputs that
    # come after options too (`run MODEL "text" --int8 "more text"`).
    if extra:
        if not hasattr(args, "inputs") or any(e.startswith("-") for e in extra):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.inputs = list(args.inputs) + extra
    try:
        return int(args.func(args) or 0)
    except (TinyshieldError, InternalError) as e:
        return report(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def report(e: Exception) -> int:
    """Print a user error as one line (exit 2), a tinyshield bug as an internal error (exit 3)."""
    if isinstance(e, InternalError):
        print(f"internal error: {e}", file=sys.stderr)
        return 3
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

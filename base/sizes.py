"""Sizes written by users (`--flash 1MB`, `--budget 0.77M`, `--budget 4MB`): one reading for every command.

Bytes use binary units: 1K = 1KB = 1KiB = 1,024 B and 1M = 1MB = 1MiB = 1,048,576 B (the shipped 1 MB
BERT's flash budget is 1,048,576 B). Parameter counts are decimal: 1K = 1,000, 1M = 1,000,000.
"""
from __future__ import annotations

import re

from base.errors import TinyshieldError

BYTES_RULE = "binary units: 1KB = 1KiB = 1,024 B, 1MB = 1MiB = 1,048,576 B"
PARAMS_RULE = "decimal: 1K = 1,000, 1M = 1,000,000"

_SUFFIXES = {"params": {"": 1, "K": 10**3, "M": 10**6},
             "bytes": {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
                       "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20}}


def parse_size(text: str, unit: str = "bytes") -> int:
    """'0.77M' -> 770,000 params; '1MB' -> 1,048,576 bytes, '900KB' -> 921,600 bytes. Positive."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    factor = _SUFFIXES[unit].get(m.group(2).upper()) if m else None
    if factor is None:
        example, rule = ("0.77M or 770000", PARAMS_RULE) if unit == "params" else ("1MB, 900KB or 1000000", BYTES_RULE)
        raise TinyshieldError(f"cannot read budget {text!r} as {unit}: write it like {example} ({rule})")
    value = int(round(float(m.group(1)) * factor))
    if value <= 0:
        raise TinyshieldError(f"budget must be positive, got {text!r}")
    return value

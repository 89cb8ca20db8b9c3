"""Where tinyshield keeps expensive artefacts (trained models, built firmware)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def build_dir() -> Path:
    """`$TINYSHIELD_BUILD`, else `build/` at the project root."""
    d = Path(os.environ.get("TINYSHIELD_BUILD", PROJECT_ROOT / "build"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def config_hash(obj) -> str:
    """Short stable hash of a JSON-able config: the cache key of an artefact."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def files_hash(paths) -> str:
    """Short hash of files' names and contents: the part of a cache key that changes with the code making it."""
    h = hashlib.sha256()
    for p in sorted(map(Path, paths)):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def artefact_dir(kind: str, cfg) -> Path:
    """`build/<kind>/<hash of cfg>/`, created on demand."""
    d = build_dir() / kind / config_hash(cfg)
    d.mkdir(parents=True, exist_ok=True)
    return d

"""Host C code built with the system compiler and cached: `build/hostlib/<hash>/<name>.so`.

The key covers every source, every header of the include directories and every flag, so an edit
rebuilds; the write is atomic, so parallel processes never load a half-written library.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from base.errors import TinyshieldError
from base.paths import build_dir


def cc() -> str:
    c = os.environ.get("CC", "gcc")
    if shutil.which(c) is None:
        raise TinyshieldError(f"C compiler {c!r} not found: install gcc (apt-get install gcc) or set $CC")
    return c


def build_shared(sources: list[Path], flags: list[str], name: str, include: list[Path] = ()) -> Path:
    """Compile `sources` with `flags` (which must include -shared -fPIC) into a cached shared library."""
    headers = [h for d in include for h in sorted(Path(d).glob("*.h"))]
    h = hashlib.sha256()
    for p in list(sources) + headers:
        h.update(str(Path(p).name).encode())
        h.update(Path(p).read_bytes())
    h.update(" ".join(flags).encode())
    out = build_dir() / "hostlib" / h.hexdigest()[:16] / f"{name}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cc(), *flags, *(f"-I{d}" for d in include), *map(str, sources), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise TinyshieldError(f"host build of {name} failed:\n{' '.join(cmd)}\n{r.stderr.strip()}")
    os.replace(tmp, out)
    return out

"""Host C code built with the system compiler and cached: `build/hostlib/<hash>/<name>.so`.

The key covers every source, every header of the include directories and every flag, so an edit
rebuilds; the write is atomic, so parallel processes never load a half-written library.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from base.errors import InternalError, TinyshieldError
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


# ---------------------------------------------------------------- reading C declarations
# The C sources are the one definition of what crosses the C boundary (function signatures,
# protocol constants); Python derives ctypes bindings from them or is tested against them.

_C_TO_CTYPES = {"void": None, "int": ctypes.c_int, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64,
                "uint32_t": ctypes.c_uint32, "uint64_t": ctypes.c_uint64, "float": ctypes.c_float,
                "double": ctypes.c_double}


@dataclass(frozen=True)
class Prototype:
    """One C function declaration: `params` are (C type, name), the type normalised ("const int8_t *",
    "int32_t"; `restrict` dropped)."""
    name: str
    ret: str
    params: tuple[tuple[str, str], ...]


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)


def _c_type(decl: str) -> tuple[str, str]:
    """'const int8_t *restrict x' -> ('const int8_t *', 'x')."""
    words = [w for w in decl.replace("*", " * ").split() if w != "restrict"]
    if len(words) < 2 or not words[-1].isidentifier():
        raise ValueError(f"cannot read the C parameter {decl!r}")
    return " ".join(words[:-1]), words[-1]


def c_prototypes(text: str, prefix: str = "tsh_") -> dict[str, Prototype]:
    """Every function declared or defined at file scope in C `text` whose name starts with `prefix`,
    by name (without the prefix)."""
    out = {}
    pat = rf"^[ \t]*((?:\w+[ \t]+)+\**)\s*{prefix}(\w+)\s*\(([^)]*)\)\s*[;{{]"
    for m in re.finditer(pat, _strip_comments(text), flags=re.M):
        ret, name, args = " ".join(m.group(1).split()), m.group(2), " ".join(m.group(3).split())
        params = () if args in ("", "void") else tuple(_c_type(a) for a in args.split(","))
        out[name] = Prototype(name, ret, params)
    return out


def c_argtypes(p: Prototype) -> tuple[list, object]:
    """ctypes (argtypes, restype) of a prototype: pointers pass as c_void_p (numpy buffers' addresses)."""
    def conv(t: str):
        if t.endswith("*"):
            return ctypes.c_void_p
        if t not in _C_TO_CTYPES:
            raise InternalError(f"{p.name}: C type {t!r} has no ctypes equivalent in base.cbuild")
        return _C_TO_CTYPES[t]
    return [conv(t) for t, _ in p.params], conv(p.ret)


def bind(dll: ctypes.CDLL, prototypes: dict[str, Prototype], prefix: str = "tsh_") -> None:
    """Give every function of `prototypes` in `dll` the argtypes and restype its C declaration says."""
    for p in prototypes.values():
        fn = getattr(dll, prefix + p.name)
        fn.argtypes, fn.restype = c_argtypes(p)


def c_constants(text: str) -> dict[str, int]:
    """Integer constants of C `text`: `#define NAME <integer>` and enumerators `NAME = <integer>`."""
    text = _strip_comments(text)
    num = r"(0[xX][0-9a-fA-F]+|\d+)[uUlL]*"
    out = {m.group(1): int(m.group(2), 0) for m in re.finditer(rf"^[ \t]*#define[ \t]+(\w+)[ \t]+{num}[ \t]*$", text, re.M)}
    for body in re.findall(r"\benum\b[^{;]*\{([^}]*)\}", text):
        for m in re.finditer(rf"(\w+)\s*=\s*{num}", body):
            out[m.group(1)] = int(m.group(2), 0)
    return out

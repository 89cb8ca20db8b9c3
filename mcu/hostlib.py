"""The C kernels built for the host with the system gcc and loaded with ctypes.

Tests call the very C code the firmware runs, in milliseconds. Libraries are cached under
`build/hostlib/<hash of sources and flags>/`, so an edit to any kernel source rebuilds.

Variants: "portable" (plain C loops) and "dsp" (the Cortex-M DSP code path, with the SMLAD/SXTB16
instructions emulated in C: the same blocking, the same integer results).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from base import cbuild
from base.errors import InternalError, TinyshieldError
from mcu.graph import DTYPES, IO_DTYPE_NAMES
from mcu.kernels import KERNELS

KERNEL_DIR = Path(__file__).resolve().parent / "firmware" / "kernels"
VARIANTS = {"portable": ["-DTSH_PORTABLE"], "dsp": ["-DTSH_EMULATE_DSP"]}
CFLAGS = ["-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror"]


def kernel_sources() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.c"))


def build_shared(sources: list[Path], flags: list[str], name: str, include: list[Path] = ()) -> Path:
    """The kernels' headers are always on the include path (and in the cache key)."""
    return cbuild.build_shared(sources, CFLAGS + flags, name, [KERNEL_DIR, *include])


def kernel_prototypes() -> dict[str, cbuild.Prototype]:
    """The C kernels' declarations in tsh_kernels.h, by kernel name (tsh_ dropped)."""
    return cbuild.c_prototypes((KERNEL_DIR / "tsh_kernels.h").read_text())


class HostKernels:
    """The C kernels of one variant, callable with the numpy kernels' arguments (flat arrays, ints)."""

    def __init__(self, variant: str = "portable"):
        if variant not in VARIANTS:
            raise TinyshieldError(f"unknown kernel variant {variant!r} ({', '.join(VARIANTS)})")
        self.variant = variant
        self.path = build_shared(kernel_sources(), VARIANTS[variant], f"libtsh_{variant}")
        self.lib = ctypes.CDLL(str(self.path))
        self._fns: dict[str, object] = {}

    def function(self, name: str):
        if name not in self._fns:
            k = KERNELS.get(name)
            if k is None:
                raise TinyshieldError(f"kernel {name!r} has no numpy reference in mcu.kernels")
            try:
                fn = getattr(self.lib, f"tsh_{name}")
            except AttributeError:
                raise TinyshieldError(f"kernel {name!r}: tsh_{name} is missing from the C kernels") from None
            proto = kernel_prototypes().get(name)
            if proto is None:
                raise InternalError(f"kernel {name!r}: tsh_{name} is in the library but not declared in tsh_kernels.h")
            fn.argtypes, fn.restype = cbuild.c_argtypes(proto)
            params = k.params

            def call(*args, _fn=fn, _params=params):
                conv = []
                for a, (pname, t) in zip(args, _params):
                    if t == "int":
                        conv.append(int(a))
                    else:
                        arr = np.asarray(a)
                        if arr.dtype != np.dtype(_dtype(t)) or not arr.flags.c_contiguous:
                            raise TinyshieldError(f"tsh_{name}: argument {pname} must be a contiguous "
                                                  f"{np.dtype(_dtype(t)).name} array, got {arr.dtype}")
                        conv.append(arr.ctypes.data)
                _fn(*conv)
            self._fns[name] = call
        return self._fns[name]

    def __getitem__(self, name: str):
        return self.function(name)

    def get(self, name: str, default=None):
        try:
            return self.function(name)
        except TinyshieldError:
            return default


def _dtype(t: str):
    from mcu.kernels import PTYPES
    return PTYPES[t]


class ModelInfo(ctypes.Structure):
    """`tsh_model_info_t` of the firmware contract (mcu/codegen.py)."""
    _fields_ = [("name", ctypes.c_char_p), ("input_dtype", ctypes.c_uint8), ("output_dtype", ctypes.c_uint8),
                ("input_rank", ctypes.c_uint8), ("output_rank", ctypes.c_uint8),
                ("input_shape", ctypes.c_uint16 * 4), ("output_shape", ctypes.c_uint16 * 4),
                ("input_scale", ctypes.c_float), ("input_zero_point", ctypes.c_int32),
                ("output_scale", ctypes.c_float), ("output_zero_point", ctypes.c_int32),
                ("input_bytes", ctypes.c_uint32), ("output_bytes", ctypes.c_uint32),
                ("arena_bytes", ctypes.c_uint32), ("macs", ctypes.c_uint32)]


class HostModel:
    """A generated model.c (+ the C kernels) built as a host shared library: `run(x)` is one
    `tsh_model_run` call, exactly the code the firmware runs."""

    def __init__(self, model_dir, variant: str = "portable"):
        d = Path(model_dir)
        if not (d / "model.c").is_file():
            raise TinyshieldError(f"{d} has no model.c: generate it first (mcu.codegen.generate)")
        srcs = kernel_sources() + [d / "model.c"]
        self.path = build_shared(srcs, VARIANTS[variant] + ["-Wno-unused-function"], "libmodel", include=[d])
        self.lib = ctypes.CDLL(str(self.path))
        self.info = ModelInfo.in_dll(self.lib, "tsh_model_info")
        self.lib.tsh_model_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.tsh_model_run.restype = None

    def run(self, x) -> np.ndarray:
        i = self.info
        in_dtype, out_dtype = (np.dtype(DTYPES[IO_DTYPE_NAMES[c]]) for c in (i.input_dtype, i.output_dtype))
        x = np.ascontiguousarray(x, dtype=in_dtype)
        if x.nbytes != i.input_bytes:
            raise TinyshieldError(f"model input must be {i.input_bytes} bytes, got {x.nbytes}")
        out = np.zeros(i.output_bytes // out_dtype.itemsize, out_dtype)
        self.lib.tsh_model_run(x.ctypes.data, out.ctypes.data)
        return out.reshape(tuple(i.output_shape[:i.output_rank]))

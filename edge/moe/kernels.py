"""The quantised expert FFN in C (`csrc/expert_ffn.c`), built for the host by base.cbuild and called with ctypes.

torch has no float x int8 product at decode shapes that beats widening the weights to float first
(`_weight_int8pack_mm` measured ~5x slower than widening), and widening a 105 kB int8 expert on every
use cost more than the product itself. The C kernel widens one weight at a time inside the product
(int4: one nibble at a time), so a quantised expert costs no more than a float32 one while holding a
quarter (an eighth) of the bytes. Its sums run in input order without fused multiply-adds, so the
results do not depend on the instruction set (see the C file).

Measured per expert use at the trained model's shape (1 x 160, 160 x 320, 320 x 160), one thread, Intel
Xeon under load 4-5: float32 in torch 13-22 us; int8 widened in torch 27-30 us; int4 nibble planes in
torch 86 us; this kernel 10.7 us (int8) and 19.7 us (int4), ctypes call included.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from base import cbuild
from base.errors import TinyshieldError

CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = ["-std=c99", "-O3", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror"]


@lru_cache(maxsize=None)
def library(portable: bool = False):
    """The built kernels; `portable` = baseline instruction set only (what the tests compare against)."""
    flags = CFLAGS + (["-DTSH_MOE_PORTABLE"] if portable else [])
    path = cbuild.build_shared(sorted(CSRC.glob("*.c")), flags, "libtsh_moe" + ("_portable" * portable),
                               [CSRC])
    lib = ctypes.CDLL(str(path))
    cbuild.bind(lib, cbuild.c_prototypes((CSRC / "tsh_moe.h").read_text()))
    return lib


def expert_ffn(h: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
               portable: bool = False) -> torch.Tensor:
    """(GELU((h @ q1) * s1) @ q2) * s2 for float32 rows h (..., d); q int8 (d x f, f x d) or packed int4
    (uint8, d/2 x f, f/2 x d), scales float32 per output channel."""
    int4 = w1.dtype == torch.uint8
    if w1.dtype not in (torch.int8, torch.uint8) or w2.dtype != w1.dtype:
        raise TinyshieldError(f"expert_ffn takes int8 or packed int4 weights, got {w1.dtype} and {w2.dtype}")
    d, f = h.shape[-1], s1.shape[-1]
    if w1.shape != ((d // 2, f) if int4 else (d, f)) or w2.shape != ((f // 2, d) if int4 else (f, d)) \
            or s2.shape[-1] != d:
        raise TinyshieldError(f"expert_ffn: weights {tuple(w1.shape)}, {tuple(w2.shape)} do not match rows of "
                              f"width {d} and {f} hidden units")
    x = h.detach().reshape(-1, d).to(torch.float32).contiguous()
    parts = [t.contiguous() for t in (w1, s1.to(torch.float32), w2, s2.to(torch.float32))]
    y = torch.empty_like(x)
    scratch = torch.empty(f, dtype=torch.float32)
    library(portable).tsh_moe_expert_ffn(x.data_ptr(), *(t.data_ptr() for t in parts), y.data_ptr(),
                                         scratch.data_ptr(), x.shape[0], d, f, int(int4))
    return y.view(h.shape).to(h.dtype)

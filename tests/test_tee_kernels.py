"""The blinded accelerator's field GEMM kernels (tee.fieldgemm) under every instruction-set limit oneDNN knows.

oneDNN picks its int8 code at load time from the CPU and ONEDNN_MAX_CPU_ISA, so each limit runs in a fresh
Python process (this file run as a script) that reports, for every kernel: its self-test verdict, what
forcing it with TINYSHIELD_FIELD_GEMM does, and whether the kernel in use is exact on fresh data. A machine
with VNNI or AMX thereby exercises the AVX2 path too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from base.errors import TinyshieldError
from tee import blinded, fieldgemm, fieldmath
from tee.fieldmath import P

ISAS = ("AVX2", "AVX512_CORE", "AVX512_CORE_VNNI", "ALL")
NO_VNNI = ("AVX2", "AVX512_CORE")    # int8 products summed pairwise in a saturating int16
INT8_FAST = ("onednn-u8", "int-mm")


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def exact_on_fresh_data(seed: int = 1) -> bool:
    """The process's kernel (FieldGemm's default) against the int64 reference on masked-input-like planes (uniform
    field elements, digits from the C kernel) and layer-like weights, at MiniLM's shapes."""
    rng = np.random.default_rng(seed)
    for rows, k, m, amp in ((128, 384, 96, 127), (64, 1536, 48, 127), (3, 1536, 8, 40)):
        x = rng.integers(0, P, (rows, k)).astype(np.uint32)
        wt = rng.integers(-amp, amp + 1, (k, m)).astype(np.int8)
        wt[:, 0] = 127                          # one output at the worst case: split along k for float32 sums
        if not np.array_equal(fieldgemm.FieldGemm(torch.from_numpy(wt))(x), fieldmath.int8_matmul_mod(x, wt)):
            return False
    return True


def refused_by_freivalds(kernel: type) -> tuple[bool, bool]:
    """One blinded layer with real weights-like values and an honest pad: does `kernel` (unchecked) give a wrong
    y~, and does the enclave's check then refuse it? (True, True) for a kernel that is inexact here."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 384)).astype(np.float32)
    x = rng.standard_normal((64, 384)).astype(np.float32)
    layer = blinded.make_layer(w, np.zeros(96, np.float32), x)
    pad = blinded.make_pad({"l": layer}, {"l": 64})            # made with the process's exact kernel
    planes, rhs = blinded.blind(torch.from_numpy(x), layer, pad["l.r"], pad["l.v"])
    y = fieldgemm.FieldGemm(torch.from_numpy(layer.w_q.T.astype(np.int8)), kernel).planes(planes)
    wrong = not np.array_equal(y, layer.gemm.planes(planes))
    return wrong, blinded.unblind(y, pad["l.u"], pad["l.s"], rhs, layer) is None


def probe() -> dict:
    """What this process (with its ONEDNN_MAX_CPU_ISA) finds; run as a script by the tests below."""
    torch.set_num_threads(2)
    out = {"kernels": {}, "chosen": fieldgemm.chosen().name, "exact": exact_on_fresh_data()}
    for name, kernel in fieldgemm.KERNELS.items():
        if not kernel.available:
            continue
        r = {"self_test": fieldgemm.self_test(kernel)}
        if r["self_test"] is not None:
            r["wrong"], r["refused"] = refused_by_freivalds(kernel)
        os.environ[fieldgemm.ENV] = name
        fieldgemm.chosen.cache_clear()
        try:
            r["forced"] = fieldgemm.chosen().name
            r["forced_exact"] = exact_on_fresh_data(seed=2)
        except TinyshieldError as e:
            r["forced"], r["error"] = None, str(e)
        del os.environ[fieldgemm.ENV]
        fieldgemm.chosen.cache_clear()
        out["kernels"][name] = r
    return out


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != fieldgemm.ENV}
    env |= {"TINYSHIELD_BUILD": str(tmp_path_factory.mktemp("kernels")), "OMP_NUM_THREADS": "2"}

    def start(isa):
        return subprocess.Popen([sys.executable, __file__], env=env | {"ONEDNN_MAX_CPU_ISA": isa}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def result(isa, p):
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"{isa}: {stderr[-3000:]}"
        return json.loads(stdout.strip().splitlines()[-1])

    res = {ISAS[0]: result(ISAS[0], start(ISAS[0]))}       # builds the C library the others then reuse
    procs = {isa: start(isa) for isa in ISAS[1:]}
    return res | {isa: result(isa, p) for isa, p in procs.items()}


@pytest.mark.parametrize("isa", ISAS)
def test_the_chosen_kernel_is_exact_under_every_isa_limit(probes, isa):
    r = probes[isa]
    assert r["exact"], r
    passing = [n for n, k in r["kernels"].items() if k["self_test"] is None]
    assert r["chosen"] == passing[0]                                 # the fastest that passes
    assert r["kernels"]["float32"]["self_test"] is None              # exact by construction, on every CPU
    for name, k in r["kernels"].items():
        if k["self_test"] is None:                                   # forcing a passing kernel uses it, exactly
            assert k["forced"] == name and k["forced_exact"], (name, k)
        else:                                                        # forcing a failing one is refused, loudly
            assert k["forced"] is None and "not exact on this CPU" in k["error"] and fieldgemm.ENV in k["error"]
            assert k["wrong"] and k["refused"], (name, k)            # its answers are wrong; Freivalds says so


@pytest.mark.parametrize("isa", NO_VNNI)
def test_int8_kernels_are_rejected_without_vnni(probes, isa):
    """Without VNNI, oneDNN's u8 x s8 GEMM saturates an int16 for large bytes: the self-test sees it, and the
    weight halves (no pair of products can saturate) are what the accelerator uses instead."""
    r = probes[isa]
    for name in INT8_FAST:
        if name in r["kernels"]:
            assert r["kernels"][name]["self_test"] is not None, (name, r)
    if "onednn-u8-halves" in r["kernels"]:
        assert r["chosen"] == "onednn-u8-halves"


def test_vnni_keeps_the_fast_int8_kernel(probes):
    """Where the CPU has VNNI, the fast kernel passes and is used (no needless fall back to the slower ones)."""
    if not _cpu_flags() & {"avx512_vnni", "amx_int8"} or "onednn-u8" not in probes["ALL"]["kernels"]:
        pytest.skip("this CPU has no AVX-512 VNNI or AMX")
    assert probes["AVX512_CORE_VNNI"]["chosen"] == probes["ALL"]["chosen"] == "onednn-u8"


def test_forcing_an_unknown_kernel_is_refused(monkeypatch):
    monkeypatch.setenv(fieldgemm.ENV, "int4")
    fieldgemm.chosen.cache_clear()
    try:
        with pytest.raises(TinyshieldError, match="names no field GEMM kernel.*float32"):
            fieldgemm.chosen()
    finally:
        monkeypatch.delenv(fieldgemm.ENV)
        fieldgemm.chosen.cache_clear()


def test_weights_outside_the_int8_range_are_refused():
    """-128 is never produced by quantisation and would let a pair of halves' products reach 2^15."""
    with pytest.raises(TinyshieldError, match="-127..127"):
        fieldgemm.FieldGemm(torch.full((4, 2), -128, dtype=torch.int8), fieldgemm.Float32)


def test_self_test_cases_reach_the_limits():
    """The adversarial cases hold every extreme byte and weight, at the layer limits of k and a single row."""
    cases = list(fieldgemm._cases())
    assert {wt.shape[0] for _, wt in cases} >= {4, 1032, 1536} and min(d.shape[0] for d, _ in cases) == 3
    for d, wt in cases:
        assert {0, 255} <= set(np.unique(d)) and {-127, 127} <= set(np.unique(wt))
        assert (d == 255).all(1).any() and (wt == 127).all(0).any() and (wt == -127).all(0).any()
    assert [c.stop - c.start for c in fieldgemm.exact_parts(cases[-1][1].T)] == [1032, 504]


if __name__ == "__main__":
    print(json.dumps(probe()))

"""The C kernels compiled for the Cortex-M55 (Helium/MVE paths, tsh_mve.c) and run on the emulated
mps3-an547 equal the numpy reference bit for bit: the Cortex-M4 kernel zoo (every kernel, adversarial
requantisation parameters), then firmwares whose calls have shapes and parameters drawn by hypothesis
(K with and without a 16-byte tail, odd channel counts, row counts not a multiple of the blocking,
extreme multipliers and shifts, clamps, rails; softmax masks and tables, LayerNorm scales)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mcu.graph import Buffer, Call, Const, Graph, Ref, Schedule, Tensor
from mcu.kernels import conv_patch_len, exp_lut, pack_fc_weights
from tests.test_kernels_m4 import kernel_zoo

pytestmark = pytest.mark.slow
BOARD = "mps3-an547"
X = 8192                         # bytes of the input every call reads from

zp = st.integers(-128, 127)
mult = st.one_of(st.integers(0, (1 << 31) - 1), st.sampled_from([0, 1, 1 << 30, (1 << 31) - 1]),
                 st.integers(-(1 << 31), -1))
shift = st.one_of(st.integers(-31, 30), st.integers(-23, -1), st.sampled_from([-3, -2, -1, 0, 1]))  # small: ties


def on_device(s: Schedule, x: np.ndarray, tmp_path) -> None:
    from mcu.codegen import generate
    from mcu.compile import build_firmware
    from mcu.device import open_board
    from mcu.execute import run
    from mcu.planner import plan

    p = plan(s)
    want = run(s, {"input": x}, p)["output"]
    fw = build_firmware(generate(s, p, tmp_path / s.name).dir, BOARD)
    with open_board(fw) as dev:
        got = dev.infer(x).output
    bad = np.flatnonzero(got != want)
    if bad.size:   # name the call whose output slot holds the first difference
        slot = {"fc_s8": 5, "conv2d_s8": 5, "add_layernorm_s8": 5, "softmax_s16": 3, "matmul_qk_s8": 2,
                "matmul_pv_s8": 2, "lut_s8": 2}
        starts = sorted((c.args[slot[c.kernel]].offset, c.op) for c in s.calls if c.kernel in slot)
        op = max((st for st in starts if st[0] <= bad[0]), default=(0, "?"))[1]
        raise AssertionError(f"device differs from numpy at {bad[:10]} (first in the output of {op})")


class Zoo:
    """One firmware's calls: constants, output slots in order, all reading one int8 input."""

    def __init__(self):
        self.tensors, self.calls, self.out = {}, [], 0

    def const(self, name, data):
        dt = {np.int8: "int8", np.int16: "int16", np.int32: "int32"}[data.dtype.type]
        self.tensors[name] = Tensor(name, data.shape, dt, "const", None, np.ascontiguousarray(data))
        return Const(name)

    def dest(self, nbytes):
        r = Ref("output", self.out)
        self.out += (nbytes + 3) // 4 * 4
        return r

    def schedule(self, name):
        t = dict(self.tensors)
        t["input"] = Tensor("input", (X,), "int8", "input")
        t["output"] = Tensor("output", (self.out,), "int8", "output")
        g = Graph(name, t, [], ["input"], ["output"])
        bufs = {"input": Buffer("input", X, "input"), "output": Buffer("output", self.out, "output")}
        return Schedule(name, g, bufs, self.calls)


def draw_fc(d, z: Zoo, j: int):
    M, N = d(st.integers(1, 8)), d(st.integers(1, 11))
    K = d(st.one_of(st.integers(1, 40).map(lambda g: 4 * g), st.integers(1, 70)))
    xs = K + d(st.integers(0, 5))
    x_off = d(st.integers(0, X - M * xs))
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1)))
    W = rng.integers(-128, 128, size=(N, K)).astype(np.int8)
    if d(st.booleans()):
        W[:] = d(st.sampled_from([-128, 127]))
    if d(st.booleans()):   # the common case: the short requantisation applies
        bias = rng.integers(-2 ** 20, 2 ** 20, N)
        mu, sh = rng.integers(2 ** 30, 2 ** 31, N), rng.integers(-20, -1, N)
        lo, hi = -128, 127
    else:
        bias = rng.choice([-(2 ** 30), 2 ** 30, 5, -7, 2 ** 29, -(2 ** 29)], N)
        mu = np.array([d(mult) for _ in range(N)])
        sh = np.array([d(shift) for _ in range(N)])
        lo = d(st.integers(-128, 127))
        hi = d(st.integers(lo, 127))
    ys = N + d(st.integers(0, 3))
    args = (Ref("input", x_off), z.const(f"w{j}", pack_fc_weights(W)), z.const(f"b{j}", bias.astype(np.int32)),
            z.const(f"m{j}", mu.astype(np.int32)), z.const(f"s{j}", sh.astype(np.int32)), z.dest(M * ys),
            M, K, N, xs, ys, d(zp), lo, hi)
    z.calls.append(Call("fc_s8", args, f"fc{j}", M * K * N))


def draw_qk(d, z: Zoo, j: int):
    Lq, Lk = d(st.integers(1, 9)), d(st.integers(1, 12))
    dh = d(st.one_of(st.sampled_from([16, 32, 64]), st.integers(1, 70)))
    qs, ks, ss = dh + d(st.integers(0, 4)), dh + d(st.integers(0, 4)), Lk + d(st.integers(0, 2))
    q_off, k_off = d(st.integers(0, X - Lq * qs)), d(st.integers(0, X - Lk * ks))
    args = (Ref("input", q_off), Ref("input", k_off), z.dest(Lq * ss), Lq, Lk, dh, qs, ks, ss,
            d(zp), d(zp), d(mult), d(shift), d(zp))
    z.calls.append(Call("matmul_qk_s8", args, f"qk{j}", Lq * Lk * dh))


def draw_pv(d, z: Zoo, j: int):
    Lq, Lk = d(st.integers(1, 9)), d(st.integers(1, 40))
    dh = d(st.one_of(st.sampled_from([16, 32, 64]), st.integers(1, 40)))
    ps, vs, ys = Lk + d(st.integers(0, 3)), dh + d(st.integers(0, 3)), dh + d(st.integers(0, 3))
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1)))
    if d(st.booleans()):   # softmax rows: non-negative, at most 2^15
        p = rng.integers(0, 2 ** 15 + 1, size=Lq * ps)
    else:
        p = rng.choice([-(2 ** 15), 2 ** 15 - 1, 0, 1, -1], size=Lq * ps)
    args = (z.const(f"p{j}", p.astype(np.int16)), Ref("input", d(st.integers(0, X - Lk * vs))), z.dest(Lq * ys),
            Lq, Lk, dh, ps, vs, ys, d(zp), d(mult), d(shift), d(zp))
    z.calls.append(Call("matmul_pv_s8", args, f"pv{j}", Lq * Lk * dh))


def draw_conv(d, z: Zoo, j: int):
    H, W, Cin, Cout = d(st.integers(2, 9)), d(st.integers(2, 9)), d(st.integers(1, 5)), d(st.integers(1, 9))
    k, stride, pad = d(st.sampled_from([1, 2, 3, 4])), d(st.integers(1, 2)), d(st.integers(0, 1))
    Hout, Wout = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    if Hout < 1 or Wout < 1:
        return
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1)))
    Wc = rng.integers(-128, 128, size=(Cout, conv_patch_len(k, Cin))).astype(np.int8)
    args = (Ref("input", d(st.integers(0, X - H * W * Cin))), z.const(f"cw{j}", pack_fc_weights(Wc)),
            z.const(f"cb{j}", rng.integers(-(1 << 20), 1 << 20, Cout).astype(np.int32)),
            z.const(f"cm{j}", np.array([d(mult) for _ in range(Cout)], np.int32)),
            z.const(f"cs{j}", np.array([d(shift) for _ in range(Cout)], np.int32)),
            z.dest(Hout * Wout * Cout), H, W, Cin, Cout, Hout, Wout, k, stride, pad, d(zp), d(zp), -128, 127)
    z.calls.append(Call("conv2d_s8", args, f"conv{j}", Hout * Wout * Cout * k * k * Cin))


def draw_ln(d, z: Zoo, j: int):
    M, dm = d(st.integers(1, 20)), d(st.one_of(st.sampled_from([32, 64, 128]), st.integers(1, 80)))
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1)))
    gm = np.array([d(mult) for _ in range(dm)]) if d(st.booleans()) else rng.integers(1 << 30, 1 << 31, dm)
    gs = np.array([d(shift) for _ in range(dm)]) if d(st.booleans()) else rng.integers(-20, -1, dm)
    beta = rng.integers(-60, 61, dm) if d(st.booleans()) else rng.choice([-(2 ** 31), 2 ** 31 - 1, 0, 2 ** 30], dm)
    lim = 1 << 12
    args = (Ref("input", d(st.integers(0, X - M * dm))), Ref("input", d(st.integers(0, X - M * dm))),
            z.const(f"gm{j}", gm.astype(np.int32)), z.const(f"gs{j}", gs.astype(np.int32)),
            z.const(f"gb{j}", beta.astype(np.int32)), z.dest(M * dm), M, dm, d(zp), d(zp),
            d(st.integers(-lim, lim)), d(st.integers(-lim, lim)), d(st.sampled_from([0, 1, 4096, 1 << 20])), d(zp))
    z.calls.append(Call("add_layernorm_s8", args, f"ln{j}"))


def draw_softmax(d, z: Zoo, j: int):
    Lq, Lk = d(st.integers(1, 6)), d(st.integers(1, 70))
    ss, ps = Lk + d(st.integers(0, 3)), Lk + d(st.integers(0, 3))
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1)))
    kind = d(st.sampled_from(["all", "prefix", "random"]))
    n = Lk if kind == "all" else d(st.integers(0, Lk))
    mask = (np.arange(Lk) < n) if kind != "random" else rng.integers(0, 2, Lk)
    lut = d(st.sampled_from(["exp", "random", "tiny"]))
    table = {"exp": exp_lut(d(st.floats(0.01, 0.5))), "random": rng.integers(0, 32769, 256),
             "tiny": (np.arange(256) < 1).astype(np.int64)}[lut]
    args = (Ref("input", d(st.integers(0, X - Lq * ss))), z.const(f"mask{j}", mask.astype(np.int8)),
            z.const(f"lut{j}", table.astype(np.int32)), z.dest(2 * Lq * ps), Lq, Lk, ss, ps)
    z.calls.append(Call("softmax_s16", args, f"softmax{j}"))


def draw_lut(d, z: Zoo, j: int):
    n = d(st.integers(1, 300))
    table = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1))).integers(-128, 128, 256).astype(np.int8)
    z.calls.append(Call("lut_s8", (Ref("input", d(st.integers(0, X - n))), z.const(f"t{j}", table), z.dest(n), n),
                        f"lut{j}"))


def test_kernel_zoo_on_the_emulated_cortex_m55_equals_numpy(tmp_path, arm_toolchain):
    s, x = kernel_zoo()
    on_device(s, x, tmp_path)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_drawn_linear_kernels_on_the_emulated_cortex_m55_equal_numpy(tmp_path, arm_toolchain, data):
    d = data.draw
    z = Zoo()
    for j in range(6):
        draw_fc(d, z, j)
    for j in range(4):
        draw_qk(d, z, j)
        draw_pv(d, z, j)
    for j in range(2):
        draw_conv(d, z, j)
        draw_ln(d, z, j)
        draw_softmax(d, z, j)
        draw_lut(d, z, j)
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1)))
    x = rng.integers(-128, 128, size=X).astype(np.int8)
    x[d(st.integers(0, X - 1024)):][:1024] = d(st.sampled_from([-128, 127]))   # a run at one rail
    on_device(z.schedule(f"mve-zoo-{d(st.integers(0, 10 ** 6))}"), x, tmp_path)

"""fc_s8w16 (fully connected with the int8 weights stored widened to int16 in the order the Cortex-M4
loop reads them) equals fc_s8 on the int8 layout bit for bit: numpy == C on the host (portable and
DSP builds) and on the emulated Cortex-M4 (the LDM + SMLAD assembly block)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from mcu import kernels as K
from mcu.graph import Buffer, Call, Const, Graph, Ref, Schedule, Tensor
from tests.test_kernels import SETTINGS, both, ck, i8, mult, rand, shift, zp  # noqa: F401  (ck: fixture)


@SETTINGS
@given(st.data())
def test_pack_s16_roundtrip(data):
    d = data.draw
    N, Kd = d(st.integers(1, 9)), d(st.integers(1, 40))
    W = i8(d, N * Kd).reshape(N, Kd)
    w = K.pack_fc_weights_s16(W)
    assert w.dtype == np.int16 and w.size == N * Kd
    assert np.array_equal(K.unpack_fc_weights_s16(w, N, Kd), W)


@SETTINGS
@given(st.data())
def test_fc_s8w16_equals_fc_s8(ck, data):
    d = data.draw
    M, Kd, N = d(st.integers(1, 7)), d(st.integers(1, 70)), d(st.integers(1, 7))
    xs, ys = Kd + d(st.integers(0, 3)), N + d(st.integers(0, 3))
    lo = d(st.integers(-128, 127))
    hi = d(st.integers(lo, 127))
    W = i8(d, N * Kd).reshape(N, Kd)
    rest = [rand(d, N, -(1 << 30), 1 << 30, np.int32), np.array([d(mult) for _ in range(N)], dtype=np.int32),
            np.array([d(shift) for _ in range(N)], dtype=np.int32), rand(d, M * ys, -128, 127, np.int8),
            M, Kd, N, xs, ys, d(zp), lo, hi]
    x = i8(d, M * xs)
    wide = both(ck, "fc_s8w16", [x, K.pack_fc_weights_s16(W), *rest], [5])
    narrow = both(ck, "fc_s8", [x, K.pack_fc_weights(W), *rest], [5])
    assert np.array_equal(wide[5], narrow[5])


# (M, K, N, requantisation): three-row blocks over 1..4 chunks of steps, two-row and single-row tails,
# an odd last channel, K beyond the block's maximum, the rails of the short requantisation, and
# parameters the block does not take (row by row)
M4_CASES = [(7, 128, 9, "fast"), (5, 36, 6, "fast"), (3, 260, 5, "fast"), (4, 516, 4, "fast"),
            (8, 512, 6, "edge"), (2, 96, 4, "edge"), (6, 64, 8, "slow"), (2, 30, 3, "slow"), (1, 12, 2, "fast")]


def wide_schedule(seed=0):
    rng = np.random.default_rng(seed)
    X = 4096
    tensors, calls, off = {}, [], 0

    def const(name, data):
        dt = {np.int8: "int8", np.int16: "int16", np.int32: "int32"}[data.dtype.type]
        tensors[name] = Tensor(name, data.shape, dt, "const", None, np.ascontiguousarray(data))
        return Const(name)

    for j, (M, Kd, N, kind) in enumerate(M4_CASES):
        W = rng.integers(-128, 128, size=(N, Kd)).astype(np.int8)
        lo, hi, y_zp = -128, 127, int(rng.integers(-128, 128))
        if kind == "fast":
            bias, mu, sh = rng.integers(-2 ** 20, 2 ** 20, N), rng.integers(2 ** 30, 2 ** 31, N), rng.integers(-20, -6, N)
        elif kind == "edge":
            bias = rng.choice([-(2 ** 29) + 1, 2 ** 29 - 1, 0], N)
            mu, sh = rng.choice([0, 2 ** 31 - 1, 2 ** 30], N), rng.choice([-1, -23, -2], N)
            y_zp = -128 if Kd == 512 else 127
        else:
            bias, mu, sh = rng.choice([-(2 ** 30), 2 ** 30, 5], N), rng.choice([0, 1, 2 ** 31 - 1, 2 ** 30], N), rng.choice([-31, 0, 3, 30, -25], N)
            lo, hi = -20, 90
        params = [const(f"b{j}", bias.astype(np.int32)), const(f"m{j}", mu.astype(np.int32)),
                  const(f"s{j}", sh.astype(np.int32))]
        for layout, name, packed in [("w16", "fc_s8w16", K.pack_fc_weights_s16(W)), ("w8", "fc_s8", K.pack_fc_weights(W))]:
            calls.append(Call(name, (Ref("input"), const(f"{layout}-{j}", packed), *params, Ref("output", off),
                                     M, Kd, N, Kd, N, y_zp, lo, hi), f"{layout}-{j}", M * Kd * N))
            off += (M * N + 3) // 4 * 4
    tensors["input"] = Tensor("input", (X,), "int8", "input")
    tensors["output"] = Tensor("output", (off,), "int8", "output")
    g = Graph("fc-wide", tensors, [], ["input"], ["output"])
    bufs = {"input": Buffer("input", X, "input"), "output": Buffer("output", off, "output")}
    x = rng.integers(-128, 128, size=X).astype(np.int8)
    return Schedule("fc-wide", g, bufs, calls), x


@pytest.mark.slow
def test_fc_s8w16_on_the_emulated_cortex_m4(tmp_path, arm_toolchain):
    from mcu.codegen import generate
    from mcu.compile import build_firmware
    from mcu.device import open_board
    from mcu.execute import run
    from mcu.planner import plan

    s, x = wide_schedule()
    p = plan(s)
    gen = generate(s, p, tmp_path / "fc-wide")
    want = run(s, {"input": x}, p)["output"]
    fw = build_firmware(gen.dir, "mps2-an386")
    with open_board(fw) as dev:
        got = dev.infer(x).output
    assert np.array_equal(got, want), f"device differs at {np.flatnonzero(got != want)[:10]}"
    # each case's int16-layout output equals its int8-layout output
    off = 0
    for M, Kd, N, _ in M4_CASES:
        n = (M * N + 3) // 4 * 4
        assert np.array_equal(got[off:off + M * N], got[off + n:off + n + M * N]), (M, Kd, N)
        off += 2 * n


def test_widen_fc_weights_keeps_the_outputs_and_respects_the_flash_budget():
    from mcu.execute import run
    from mcu.planner import check, plan
    from mcu.schedules import layerwise
    from mcu.weight_layout import CODE_RESERVE, const_bytes_used, widen_fc_weights
    from tools.bench.kernels import fc_graph

    s = layerwise(fc_graph(7, 64, 10))
    used = const_bytes_used(s)
    assert widen_fc_weights(s, CODE_RESERVE + used + 64 * 10 - 1) is s      # one byte short: unchanged
    w = widen_fc_weights(s, CODE_RESERVE + used + 64 * 10)
    assert [c.kernel for c in w.calls] == ["fc_s8w16"] and w.params["wide_fc_weights"] == ["fc.weight"]
    assert const_bytes_used(w) == used + 64 * 10                            # the int8 copy is not emitted
    p = plan(w)
    check(p, w)
    x = np.random.default_rng(1).integers(-128, 128, size=7 * 64).astype(np.int8)
    assert np.array_equal(run(w, {"input": x}, p)["output"], run(s, {"input": x}, plan(s))["output"])

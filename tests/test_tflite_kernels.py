"""The kernels of imported .tflite models (mcu.tflite_kernels): every C twin (host build, portable and
DSP paths) equals its numpy reference bit for bit, on random and adversarial inputs."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mcu import kernels as K
from mcu import tflite_kernels as T
from mcu.hostlib import HostKernels
from tests.test_kernels import both, i8, mult, rand, shift, zp

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scale = st.floats(1e-4, 2.0)


@pytest.fixture(scope="module", params=["portable", "dsp"])
def ck(request):
    return HostKernels(request.param)


def shape4(draw):
    return tuple(draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 4))))


@SETTINGS
@given(st.data())
def test_binary(ck, data):
    d = data.draw
    y = shape4(d)
    # each operand: the output shape with some dimensions broadcast (1) and maybe fewer leading dims
    def operand():
        s = [1 if d(st.booleans()) else v for v in y]
        return tuple(s[d(st.integers(0, len(s) - 1)):])
    sa, sb = operand(), operand()
    op = d(st.sampled_from(sorted(T.BINARY_OPS)))
    p = T.binary_params(op, d(scale), d(scale), d(scale), d(zp), d(zp), d(zp))
    if d(st.booleans()):     # adversarial multipliers and shifts, not only what TFLite would prepare
        p[4], p[6], p[8] = d(mult), d(mult), d(mult)
        p[5], p[7], p[9] = d(st.integers(-31, 0)), d(st.integers(-31, 0)), d(shift)
    a, b = i8(d, int(np.prod(sa))), i8(d, int(np.prod(sb)))
    n = int(np.prod(y))
    both(ck, "binary_s8", [a, b, np.zeros(n, np.int8), T.broadcast_dims(y, sa, sb), p, T.BINARY_OPS[op]], [2])


def test_binary_broadcast_is_numpy_broadcast():
    """binary_s8 with identity arithmetic (MUL by a constant 1, scale 1) broadcasts like numpy."""
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (2, 3, 4), dtype=np.int64).astype(np.int8)
    b = np.ones((3, 1), np.int8)
    y = np.zeros(24, np.int8)
    p = T.binary_params("MUL", 1.0, 1.0, 1.0, 0, 0, 0)
    K.KERNELS["binary_s8"](a.ravel(), b.ravel(), y, T.broadcast_dims((2, 3, 4), a.shape, b.shape), p,
                           T.BINARY_OPS["MUL"])
    assert np.array_equal(y.reshape(2, 3, 4), a * b)


@SETTINGS
@given(st.data())
def test_matmul_kn(ck, data):
    """BATCH_MATMUL with the right operand as (K, N) rows, strided views on every operand (a head of
    v read in place) and adversarial zero points, multipliers and shifts."""
    d = data.draw
    M, N = d(st.integers(1, 5)), d(st.integers(1, 70))
    Kd = d(st.sampled_from([d(st.integers(1, 40)), d(st.integers(1000, 1100))]))   # widened, and the plain loop
    sa, sb, sy = Kd + d(st.integers(0, 3)), N + d(st.integers(0, 3)), N + d(st.integers(0, 3))
    args = [i8(d, M * sa), i8(d, Kd * sb), np.zeros(M * sy, np.int8), M, N, Kd, sa, sb, sy, d(zp), d(zp), d(mult),
            d(shift), d(zp)]
    both(ck, "matmul_kn_s8", args, [2])


@SETTINGS
@given(st.data())
def test_depthwise(ck, data):
    """DEPTHWISE_CONV_2D: depth multipliers, strides, dilations, paddings (also more than the kernel
    reaches, and none), adversarial multipliers, shifts, zero points and activation ranges."""
    d = data.draw
    H, W, C, dm = d(st.integers(1, 7)), d(st.integers(1, 7)), d(st.integers(1, 5)), d(st.integers(1, 3))
    kh, kw, sh, sw, dh, dw = (d(st.integers(1, 3)) for _ in range(6))
    pad_h, pad_w = d(st.integers(0, 3)), d(st.integers(0, 3))
    Hout = max(1, (H + 2 * pad_h - dh * (kh - 1) - 1) // sh + 1)
    Wout = max(1, (W + 2 * pad_w - dw * (kw - 1) - 1) // sw + 1)
    Co = C * dm
    lo = d(st.integers(-128, 127))
    args = [i8(d, H * W * C), i8(d, kh * kw * Co), rand(d, Co, -(1 << 20), 1 << 20, np.int32),
            np.array([d(mult) for _ in range(Co)], np.int32), np.array([d(shift) for _ in range(Co)], np.int32),
            np.zeros(Hout * Wout * Co, np.int8), H, W, C, dm, Hout, Wout, kh, kw, sh, sw, dh, dw, pad_h, pad_w,
            d(zp), d(zp), lo, d(st.integers(lo, 127))]
    both(ck, "depthwise_s8", args, [5])


@SETTINGS
@given(st.data())
def test_softmax(ck, data):
    d = data.draw
    rows, depth = d(st.integers(1, 4)), d(st.integers(1, 300))
    m, ls, dmin = T.softmax_params(d(st.floats(1e-3, 1.0)), d(st.sampled_from([1.0, 0.5, 2.0])))
    both(ck, "softmax_s8", [i8(d, rows * depth), np.zeros(rows * depth, np.int8), rows, depth, m, ls, dmin], [1])


@SETTINGS
@given(st.data())
def test_mean(ck, data):
    d = data.draw
    outer, n, inner = d(st.integers(1, 4)), d(st.integers(1, 200)), d(st.integers(1, 5))
    m, s = T.mean_params(d(scale), d(scale), n)
    if d(st.booleans()):
        m, s = d(mult), d(st.integers(-31, 0))
    both(ck, "mean_s8", [i8(d, outer * n * inner), np.zeros(outer * inner, np.int8), outer, n, inner, d(zp), m, s,
                         d(zp)], [1])


@SETTINGS
@given(st.data())
def test_int16_mean_and_requant(ck, data):
    d = data.draw
    rng = np.random.default_rng(d(st.integers(0, 2 ** 31)))
    outer, n, inner = d(st.integers(1, 3)), d(st.integers(1, 100)), d(st.integers(1, 4))
    x16 = rng.integers(-32768, 32768, outer * n * inner).astype(np.int16)
    m, s = T.mean_params(d(scale), d(scale), n)
    both(ck, "mean_s16", [x16, np.zeros(outer * inner, np.int16), outer, n, inner, d(st.integers(-300, 300)), m, s,
                          d(st.integers(-300, 300))], [1])
    m, s = d(mult), d(shift)
    both(ck, "requant_s8_s16", [i8(d, n), np.zeros(n, np.int16), n, d(zp), m, s, d(st.integers(-1000, 1000))], [1])
    both(ck, "requant_s16_s8", [x16[:n].copy(), np.zeros(n, np.int8), n, d(st.integers(-1000, 1000)), m, s, d(zp)], [1])


@SETTINGS
@given(st.data())
def test_avg_pool(ck, data):
    d = data.draw
    H, W, C = d(st.integers(1, 9)), d(st.integers(1, 9)), d(st.integers(1, 5))
    kh, kw, sh, sw = d(st.integers(1, 4)), d(st.integers(1, 4)), d(st.integers(1, 3)), d(st.integers(1, 3))
    ph, pw = d(st.integers(0, kh - 1)), d(st.integers(0, kw - 1))
    Hout, Wout = max(1, (H + 2 * ph - kh) // sh + 1), max(1, (W + 2 * pw - kw) // sw + 1)
    lo = d(st.integers(-128, 0))
    both(ck, "avg_pool_s8", [i8(d, H * W * C), np.zeros(Hout * Wout * C, np.int8), H, W, C, Hout, Wout, kh, kw, sh,
                             sw, ph, pw, lo, d(st.integers(lo, 127))], [1])

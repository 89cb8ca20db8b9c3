"""Imported .tflite models compute what TFLite Micro computes, bit for bit.

Per operator: single-op models written with tinyshield's own .tflite writer (edge.litert.writer; the
writer is only the source of these tiny test models), random scales, zero points, shapes, weights and
inputs (with saturated rails), the lowering run by the numpy reference executor against the
`tflite_micro` interpreter. Whole fixtures made by litert-torch + ai-edge-quantizer
(tests/fixtures/tflite): host reference and the emulated board against TFLite Micro. Refusals:
unsupported operators, corrupt and truncated files, nothing written."""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from base.errors import TinyshieldError
from edge.litert.runtime import Interpreter, MicroInterpreter
from edge.litert.writer import Builder, Quant
from mcu.execute import run
from mcu.from_tflite import dequantise_output, lower_tflite, quantise_input
from mcu.planner import check, plan
from mcu.schedules import layerwise

FIXTURES = Path(__file__).parent / "fixtures" / "tflite"
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scale = st.floats(1e-3, 0.5)
zp = st.integers(-128, 127)


def q(d, zero=None):
    return Quant.per_tensor(d(scale), d(zp) if zero is None else zero)


def inputs(d, shape, n=3):
    rng = np.random.default_rng(d(st.integers(0, 2 ** 31)))
    xs = [rng.integers(-128, 128, size=shape).astype(np.int8) for _ in range(n)]
    xs.append(rng.choice(np.array([-128, 127], np.int8), size=shape))
    return xs


def same_as_micro(model: bytes, xs) -> None:
    g = lower_tflite(model)
    s = layerwise(g)
    p = plan(s)
    check(p, s)
    mi = MicroInterpreter(model)
    for x in xs:
        ref = np.asarray(mi.run(x))
        ours = run(s, {"input": quantise_input(g, x)}, p)["output"]
        assert np.array_equal(ours.reshape(-1), ref.reshape(-1)), (ours.reshape(-1)[:16], ref.reshape(-1)[:16])


def weights(d, shape, axis=0):
    rng = np.random.default_rng(d(st.integers(0, 2 ** 31)))
    w = rng.integers(-127, 128, size=shape).astype(np.int8)
    n = shape[axis]
    scales = tuple(float(v) for v in rng.uniform(1e-3, 0.05, n))
    return w, Quant(scales, (0,) * n, axis), scales


@SETTINGS
@given(st.data())
def test_fully_connected(data):
    d = data.draw
    M, K, N = d(st.integers(1, 6)), d(st.integers(1, 40)), d(st.integers(1, 9))
    b = Builder("fc")
    xq = q(d)
    x = b.input("input", (1, M, K), np.int8, xq)
    w, wq, ws = weights(d, (N, K))
    rng = np.random.default_rng(0)
    bias = rng.integers(-5000, 5000, N).astype(np.int32)
    y = b.fully_connected(x, b.const("w", w, quant=wq), b.const("b", bias, quant=Quant(
        tuple(xq.scale[0] * s for s in ws), (0,) * N)), act=d(st.sampled_from([None, "relu"])), out_quant=q(d))
    same_as_micro(b.finish([y]), inputs(d, (1, M, K)))


@SETTINGS
@given(st.data())
def test_batch_matmul(data):
    d = data.draw
    B, M, K, N = d(st.integers(1, 3)), d(st.integers(1, 8)), d(st.integers(1, 16)), d(st.integers(1, 8))
    adj_y = d(st.booleans())
    rhs_shape = (B, N, K) if adj_y else (B, K, N)
    c = np.random.default_rng(d(st.integers(0, 2 ** 31))).integers(-128, 128, rhs_shape).astype(np.int8)
    b = Builder("bmm")
    x = b.input("input", (B, M, K), np.int8, q(d))
    y = b.batch_matmul(x, b.const("rhs", c, quant=q(d)), adj_y=adj_y, out_quant=q(d))
    same_as_micro(b.finish([y]), inputs(d, (B, M, K)))


@SETTINGS
@given(st.data())
def test_binary(data):
    d = data.draw
    op = d(st.sampled_from(["add", "sub", "mul", "squared_difference"]))
    shape = tuple(d(st.integers(1, 5)) for _ in range(d(st.integers(1, 4))))
    other = tuple(1 if d(st.booleans()) else s for s in shape)[d(st.integers(0, len(shape) - 1)):]
    b = Builder(op)
    x = b.input("input", shape, np.int8, q(d))
    c = np.random.default_rng(d(st.integers(0, 2 ** 31))).integers(-128, 128, other).astype(np.int8)
    k = b.const("c", c, quant=q(d))
    a, bb = (x, k) if d(st.booleans()) else (k, x)
    y = getattr(b, op)(a, bb, out_quant=q(d))
    same_as_micro(b.finish([y]), inputs(d, shape))


@SETTINGS
@given(st.data())
def test_pointwise(data):
    d = data.draw
    op = d(st.sampled_from(["logistic", "tanh", "rsqrt", "quantize", "softmax"]))
    shape = (d(st.integers(1, 4)), d(st.integers(1, 300 if op == "softmax" else 40)))
    b = Builder(op)
    xq = q(d, zero=-128 if op == "rsqrt" else None)      # RSQRT: TFLite refuses inputs below the zero point
    x = b.input("input", shape, np.int8, xq)
    if op == "logistic":
        y = b.logistic(x, out_quant=Quant.per_tensor(1 / 256, -128))
    elif op == "tanh":
        y = b.tanh(x, out_quant=Quant.per_tensor(1 / 128, 0))
    elif op == "softmax":
        y = b.softmax(x, out_quant=Quant.per_tensor(1 / 256, -128))
    elif op == "rsqrt":
        y = b.rsqrt(x, out_quant=q(d))
    else:
        y = b.quantize(x, q(d))
    same_as_micro(b.finish([y]), inputs(d, shape))


# ---------------------------------------------------------------- GELU (LiteRT has it, TFLite Micro does not)

def same_as_litert(model: bytes, xs) -> None:
    from mcu.from_tflite import litert_outputs

    g = lower_tflite(model)
    assert g.meta["not_in_micro"] == "GELU"
    s = layerwise(g)
    p = plan(s)
    check(p, s)
    ours = [run(s, {"input": quantise_input(g, x)}, p)["output"].reshape(-1) for x in xs]
    for kw in ({}, {"xnnpack": False}):          # with and without its XNNPACK delegate
        it = Interpreter(model, **kw)
        for x, y in zip(xs, ours):
            ref = np.asarray(it.run(x)).reshape(-1)
            assert np.array_equal(y, ref), (kw, np.flatnonzero(y != ref)[:8], y[y != ref][:8], ref[y != ref][:8])
    assert all(np.array_equal(y, r.reshape(-1)) for y, r in zip(ours, litert_outputs(model, xs)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_gelu_table_equals_litert(data):
    """Every int8 input (the whole 256-entry table), exact and approximate GELU, input and output scales from
    1e-4 (the output saturates) to 1 and any zero points."""
    d = data.draw
    wide = st.floats(1e-4, 1.0)
    b = Builder("gelu")
    x = b.input("input", (1, 256), np.int8, Quant.per_tensor(d(wide), d(zp)))
    y = b.gelu(x, approximate=d(st.booleans()), out_quant=Quant.per_tensor(d(wide), d(zp)))
    same_as_litert(b.finish([y]), [np.arange(-128, 128, dtype=np.int8).reshape(1, 256)])


def gelu_mlp(approximate: bool, seed: int = 0) -> bytes:
    """FULLY_CONNECTED -> GELU -> FULLY_CONNECTED, int8, per-channel weights: an MLP block."""
    rng = np.random.default_rng(seed)
    b = Builder("gelu_mlp")
    xq = Quant.per_tensor(0.05, 3)
    x = b.input("input", (1, 4, 16), np.int8, xq)
    h = x
    for i, (n, k, oq) in enumerate([(32, 16, Quant.per_tensor(0.08, -10)), (8, 32, Quant.per_tensor(0.04, 2))]):
        w = rng.integers(-127, 128, (n, k)).astype(np.int8)
        ws = tuple(float(v) for v in rng.uniform(2e-3, 2e-2, n))
        bias = rng.integers(-3000, 3000, n).astype(np.int32)
        h = b.fully_connected(h, b.const(f"w{i}", w, quant=Quant(ws, (0,) * n, 0)),
                              b.const(f"b{i}", bias, quant=Quant(tuple(xq.scale[0] * s for s in ws), (0,) * n)),
                              out_quant=oq)
        if i == 0:
            h = b.gelu(h, approximate=approximate, out_quant=Quant.per_tensor(0.03, -100))
            xq = Quant.per_tensor(0.03, -100)
    return b.finish([h])


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_in_an_mlp_is_litert_gelu(approximate):
    """In a model, GELU's output is LiteRT's GELU of LiteRT's own input to it; the model's output differs
    from LiteRT's by at most one step, where LiteRT's FULLY_CONNECTED rounds a tie unlike TFLite Micro's
    (which the board and the numpy reference follow, tested above against TFLite Micro itself)."""
    from mcu import tflite_kernels as T

    model = gelu_mlp(approximate)
    g = lower_tflite(model)
    s = layerwise(g)
    p = plan(s)
    table = next(t.data for n, t in g.tensors.items() if n.endswith(".gelu.table"))
    assert np.array_equal(table, T.litert_gelu_table(0.08, -10, 0.03, -100, approximate))
    it = Interpreter(model, preserve_all=True, xnnpack=False)
    rng = np.random.default_rng(1)
    for x in [rng.integers(-128, 128, (1, 4, 16)).astype(np.int8) for _ in range(8)]:
        ref = it.run(x).reshape(-1).astype(int)
        assert np.array_equal(it.tensor("gelu"), table[it.tensor("fc").astype(int) + 128])
        ours = run(s, {"input": quantise_input(g, x)}, p)["output"].reshape(-1).astype(int)
        assert np.abs(ours - ref).max() <= 1


def test_eval_compares_a_gelu_model_with_litert(arm_toolchain, build_tmp, capsys):
    """`tinyshield eval` on a model with GELU: one line saying TFLite Micro cannot run it, then the board
    against LiteRT's interpreter (a GELU alone: bit for bit)."""
    import json

    from tools.cli import main

    b = Builder("gelu")
    x = b.input("input", (1, 4, 16), np.int8, Quant.per_tensor(0.05, 3))
    path = build_tmp.parent / "gelu.tflite"
    path.write_bytes(b.finish([b.gelu(x, approximate=True, out_quant=Quant.per_tensor(0.03, -100))]))
    rng = np.random.default_rng(2)
    np.savez(build_tmp.parent / "test.npz", x=rng.integers(-128, 128, (6, 1, 4, 16)).astype(np.int8),
             y=np.zeros(6, np.int64))
    out = build_tmp.parent / "eval.json"
    assert main(["eval", str(path), "--board", "mps2-an386", "--data", str(build_tmp.parent / "test.npz"),
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TFLite Micro has no GELU kernel: comparing with LiteRT's interpreter instead" in text
    r = json.loads(out.read_text())
    assert r["litert_agreement"] == 1.0 and r["litert_mismatches"] == [] and "tflm_agreement" not in r
    assert r["agreement"] == 1.0        # and with the host reference


@SETTINGS
@given(st.data())
def test_mean_and_transpose(data):
    d = data.draw
    shape = tuple(d(st.integers(1, 6)) for _ in range(3))
    b = Builder("mean")
    x = b.input("input", shape, np.int8, q(d))
    if d(st.booleans()):
        axis = d(st.integers(0, 2))
        y = b.mean(x, [axis], out_quant=q(d))
    else:
        y = b.transpose(x, list(d(st.permutations([0, 1, 2]))))
    same_as_micro(b.finish([y]), inputs(d, shape))


@SETTINGS
@given(st.data())
def test_conv2d(data):
    d = data.draw
    H, Cin, Cout, k, s = d(st.integers(3, 9)), d(st.integers(1, 4)), d(st.integers(1, 6)), d(st.integers(1, 3)), \
        d(st.integers(1, 2))
    b = Builder("conv")
    xq = q(d)
    x = b.input("input", (1, H, H, Cin), np.int8, xq)
    w, wq, ws = weights(d, (Cout, k, k, Cin))
    bias = np.random.default_rng(1).integers(-3000, 3000, Cout).astype(np.int32)
    y = b.conv2d(x, b.const("w", w, quant=wq), b.const("b", bias, quant=Quant(
        tuple(xq.scale[0] * v for v in ws), (0,) * Cout)), s, act=d(st.sampled_from([None, "relu"])), out_quant=q(d))
    same_as_micro(b.finish([y]), inputs(d, (1, H, H, Cin)))


@SETTINGS
@given(st.data())
def test_depthwise_conv2d(data):
    """DEPTHWISE_CONV_2D: depth multipliers, unequal strides, dilation, SAME and VALID padding, a PAD in
    front, fused ReLU — the same outputs as TFLite Micro."""
    d = data.draw
    H, W, C, dm = d(st.integers(1, 8)), d(st.integers(1, 8)), d(st.integers(1, 4)), d(st.integers(1, 3))
    kh, kw = d(st.integers(1, 3)), d(st.integers(1, 3))
    stride = (d(st.integers(1, 2)), d(st.integers(1, 2)))
    dil = (d(st.integers(1, 2)), d(st.integers(1, 2)))
    padding = d(st.sampled_from(["VALID", "SAME"]))
    pads = ((0, 0), (d(st.integers(0, 2)), d(st.integers(0, 2))), (d(st.integers(0, 2)), d(st.integers(0, 2))), (0, 0))
    Hp, Wp = H + sum(pads[1]), W + sum(pads[2])
    if padding == "VALID" and (Hp < dil[0] * (kh - 1) + 1 or Wp < dil[1] * (kw - 1) + 1):
        padding = "SAME"
    b = Builder("dwconv")
    xq = q(d)
    x = b.input("input", (1, H, W, C), np.int8, xq)
    xp = b.pad(x, pads) if any(map(any, pads)) else x
    Co = C * dm
    w, wq, ws = weights(d, (1, kh, kw, Co), axis=3)
    bias = np.random.default_rng(2).integers(-3000, 3000, Co).astype(np.int32)
    y = b.depthwise_conv2d(xp, b.const("w", w, quant=wq), b.const("b", bias, quant=Quant(
        tuple(xq.scale[0] * v for v in ws), (0,) * Co)), stride, dm, padding, act=d(st.sampled_from([None, "relu"])),
        out_quant=q(d), dilation=dil)
    same_as_micro(b.finish([y]), inputs(d, (1, H, W, C)))


@SETTINGS
@given(st.data())
def test_slice_concat_gather(data):
    d = data.draw
    kind = d(st.sampled_from(["slice", "concat", "gather"]))
    b = Builder(kind)
    if kind == "gather":
        V, D, L = d(st.integers(1, 30)), d(st.integers(1, 16)), d(st.integers(1, 12))
        xq = q(d)
        ids = b.input("input", (L,), np.int32)
        table = np.random.default_rng(d(st.integers(0, 2 ** 31))).integers(-128, 128, (V, D)).astype(np.int8)
        y = b.gather(b.const("table", table, quant=xq), ids)
        rng = np.random.default_rng(d(st.integers(0, 2 ** 31)))
        xs = [rng.integers(0, V, L).astype(np.int32) for _ in range(3)]
        same_as_micro(b.finish([y]), xs)
        return
    shape = tuple(d(st.integers(1, 6)) for _ in range(3))
    xq = q(d)
    x = b.input("input", shape, np.int8, xq)
    if kind == "slice":
        begin = [d(st.integers(0, n - 1)) for n in shape]
        end = [d(st.integers(bg + 1, n)) for bg, n in zip(begin, shape)]
        step = [d(st.integers(1, 2)) for _ in shape]
        shrink = d(st.integers(0, 7)) if all(e - bg == 1 for bg, e in zip(begin, end)) else 0
        y = b.strided_slice(x, begin, end, step, shrink)
    else:
        axis = d(st.integers(0, 2))
        other = tuple(d(st.integers(1, 4)) if a == axis else n for a, n in enumerate(shape))
        c = np.random.default_rng(d(st.integers(0, 2 ** 31))).integers(-128, 128, other).astype(np.int8)
        parts = [x, b.const("c", c, quant=xq)] if d(st.booleans()) else [b.const("c", c, quant=xq), x, x]
        y = b.concatenation(parts, axis)
    same_as_micro(b.finish([y]), inputs(d, shape))


@SETTINGS
@given(st.data())
def test_average_pool(data):
    from edge.litert.schema import fb

    d = data.draw
    H, W, C = d(st.integers(3, 9)), d(st.integers(3, 9)), d(st.integers(1, 4))
    k, s, same = d(st.integers(1, 3)), d(st.integers(1, 3)), d(st.booleans())
    b = Builder("pool")
    x = b.input("input", (1, H, W, C), np.int8, q(d))
    Hout, Wout = (-(-H // s), -(-W // s)) if same else ((H - k) // s + 1, (W - k) // s + 1)
    y = b._out(x, (1, Hout, Wout, C), "pool")
    opt = fb.Pool2DOptionsT()
    opt.padding = fb.Padding.SAME if same else fb.Padding.VALID
    opt.strideH = opt.strideW = s
    opt.filterHeight = opt.filterWidth = k
    opt.fusedActivationFunction = d(st.sampled_from([0, 1]))
    b.op(fb.BuiltinOperator.AVERAGE_POOL_2D, [x], [y], opt, fb.BuiltinOptions.Pool2DOptions)
    same_as_micro(b.finish([y]), inputs(d, (1, H, W, C)))


@SETTINGS
@given(st.data())
def test_float_edges(data):
    """A float input quantised by the model's first QUANTIZE (done on the host, as TFLite rounds it) and
    a final DEQUANTIZE (done on the host): the float32 outputs are bit-identical too."""
    d = data.draw
    K, N = d(st.integers(1, 20)), d(st.integers(1, 6))
    b = Builder("edges")
    x = b.input("input", (1, K), np.float32)
    xq = q(d)
    xi = b.quantize(x, xq)
    w, wq, ws = weights(d, (N, K))
    y = b.dequantize(b.fully_connected(xi, b.const("w", w, quant=wq), None, out_quant=q(d)))
    model = b.finish([y])
    g = lower_tflite(model)
    s, p = layerwise(g), None
    p = plan(s)
    mi = MicroInterpreter(model)
    rng = np.random.default_rng(d(st.integers(0, 2 ** 31)))
    for _ in range(3):
        xf = (rng.standard_normal((1, K)) * d(st.floats(0.1, 50))).astype(np.float32)
        ref = np.asarray(mi.run(xf))
        ours = dequantise_output(g, run(s, {"input": quantise_input(g, xf)}, p)["output"])
        assert ours.dtype == np.float32 and np.array_equal(ours.reshape(-1).view(np.uint32),
                                                           ref.reshape(-1).view(np.uint32))


# ---------------------------------------------------------------- whole fixtures

def fixture_inputs(g, n, seed=0):
    """int8 inputs as the model's calibration saw them: standard normal values quantised."""
    rng = np.random.default_rng(seed)
    s, z = g.meta["input_q"]
    return [np.clip(np.round(rng.standard_normal(g.meta["input_shape"]) / s) + z, -128, 127).astype(np.int8)
            for _ in range(n)]


@pytest.mark.parametrize("name", ["bert64", "vit", "convattn", "vit-int16pool"])
def test_fixture_host_reference_equals_micro(name):
    data = (FIXTURES / f"{name}.tflite").read_bytes()
    same_as_micro(data, fixture_inputs(lower_tflite(data), 3))


@pytest.mark.parametrize("op", [14, 36, 97])
def test_fixture_intermediates_equal_micro(op):
    """Layer by layer: bert64 cut after an operator (edge.litert.flat.cut: its output becomes the model's)
    — the first softmax, the first LayerNorm, an FFN sigmoid — equals TFLite Micro there too."""
    from edge.litert.flat import cut

    data = cut((FIXTURES / "bert64.tflite").read_bytes(), op)
    same_as_micro(data, fixture_inputs(lower_tflite(data), 2, seed=op))


def test_fixture_on_board_equals_micro(arm_toolchain, module_build):
    """The conv + attention fixture built for the emulated board (row-block schedule): every output
    bit-identical to TFLite Micro's (and to the host reference)."""
    from mcu.build import build_model
    from mcu.device import open_board
    from mcu.from_tflite import agreement, micro_outputs

    path = FIXTURES / "convattn.tflite"
    built = build_model(str(path), "mps2-an386", schedule="tiled")
    xs = fixture_inputs(built.graph, 4, seed=3)
    with open_board(built.firmware) as dev:
        outs = [dev.infer(built.quantise_input(x)).output for x in xs]
    micro, _ = micro_outputs(path, xs)
    assert agreement(built.graph, outs, micro) == []
    assert all(np.array_equal(o.reshape(-1), built.reference(built.quantise_input(x)).reshape(-1))
               for o, x in zip(outs, xs))


# ---------------------------------------------------------------- refusals

def test_unsupported_operator_is_refused_by_index_name_and_tensors(tmp_path):
    b = Builder("relu")
    x = b.input("input", (1, 8), np.int8, Quant.per_tensor(0.05, 0))
    y = b.relu(x, name="the_relu")
    with pytest.raises(TinyshieldError, match=r"operator 0 \(RELU, inputs input\).*RELU is not supported.*the_relu"):
        lower_tflite(b.finish([y]))


@pytest.mark.parametrize("cut", [0, 7, 100, -200])
def test_truncated_file_is_one_error(cut):
    data = (FIXTURES / "convattn.tflite").read_bytes()
    with pytest.raises(TinyshieldError, match="not a valid .tflite"):
        lower_tflite(data[:cut] if cut >= 0 else data[:len(data) + cut])


def test_corrupt_file_is_one_error():
    data = bytearray((FIXTURES / "convattn.tflite").read_bytes())
    data[4:8] = b"XXXX"
    with pytest.raises(TinyshieldError, match="file identifier"):
        lower_tflite(bytes(data))


def test_refused_build_writes_nothing(build_tmp):
    from mcu.build import build_model

    b = Builder("relu")
    x = b.input("input", (1, 8), np.int8, Quant.per_tensor(0.05, 0))
    p = build_tmp.parent / "relu.tflite"
    p.write_bytes(b.finish([b.relu(x)]))
    with pytest.raises(TinyshieldError, match="RELU"):
        build_model(str(p), "mps2-an386")
    assert not build_tmp.exists() or not any(build_tmp.rglob("*"))


# ---------------------------------------------------------------- the row-block schedule

@pytest.mark.parametrize("name,rows", [("bert64", 4), ("bert64", 7), ("vit-int16pool", 16), ("convattn", 2)])
def test_row_blocks_equal_layerwise_and_shrink_the_arena(name, rows):
    """Chains of row-local ops run block by block: the same outputs, every input; a checked plan;
    a smaller arena than layerwise."""
    from mcu.tflite_schedule import chains, row_tiled

    g = lower_tflite(FIXTURES / f"{name}.tflite")
    assert chains(g), "the fixture has row-local chains"
    lw, tl = layerwise(g), row_tiled(g, rows)
    pl, pt = plan(lw), plan(tl)
    check(pt, tl)
    assert pt.arena_bytes < pl.arena_bytes
    for x in fixture_inputs(g, 2, seed=rows):
        assert np.array_equal(run(tl, {"input": x}, pt)["output"], run(lw, {"input": x}, pl)["output"])


def test_row_block_search_cuts_chains_and_stays_exact():
    """The search over block sizes and chain cuts: the block size of the lowest arena-and-calls score
    (not 1-row blocks, whose calls are dear), a checked plan no larger than that block size's without
    cuts, the same outputs as layerwise."""
    from mcu.tflite_schedule import block_score, block_sizes, row_tiled, search_rows
    from mcu.tflite_views import attention_views

    g = lower_tflite(FIXTURES / "bert64.tflite")
    s = search_rows(g)
    p = plan(s)
    check(p, s)
    sizes = block_sizes(attention_views(g))
    rows, arena, calls = next(c for c in sizes if c[0] == s.params["rows"])
    assert rows > 1 and all(block_score(arena, calls) <= block_score(a, n) for _, a, n in sizes)
    assert p.arena_bytes <= arena
    lw = layerwise(g)
    pl = plan(lw)
    for x in fixture_inputs(g, 2, seed=5):
        assert np.array_equal(run(s, {"input": x}, p)["output"], run(lw, {"input": x}, pl)["output"])


# ---------------------------------------------------------------- attention on views, query-row chains

@pytest.mark.parametrize("name", ["bert64", "vit", "convattn", "vit-int16pool"])
def test_attention_views_equal_the_imported_graph(name):
    """The view passes leave out the TRANSPOSE copies around every batch matmul (bert64: all of them)
    and change no output bit."""
    from mcu.execute import reference
    from mcu.tflite_views import attention_views

    g = lower_tflite(FIXTURES / f"{name}.tflite")
    v = attention_views(g)
    assert not any(op.kind == "tfl_batch_matmul" for op in v.ops)
    assert sum(op.kind == "permute" for op in v.ops) < sum(op.kind == "permute" for op in g.ops)
    if name == "bert64":
        assert not any(op.kind == "permute" for op in v.ops)
        assert any(op.kind == "tfl_matmul" and op.attrs["b_kn"] for op in v.ops), "v is read in place"
    for x in fixture_inputs(g, 2, seed=11):
        assert np.array_equal(reference(v, {"input": x})["output"], reference(g, {"input": x})["output"])


@pytest.mark.parametrize("name,rows", [("bert64", 1), ("bert64", 4), ("bert64", 5), ("convattn", 3),
                                       ("vit-int16pool", 8)])
def test_query_row_chains_equal_layerwise(name, rows):
    """Query-row chains (q projection -> attention -> output projection -> residual -> FFN per block of
    rows, k and v complete before) with outputs written over the residual input: the numpy reference
    and the C kernels of the host build both give layerwise's outputs bit for bit, in a checked plan
    smaller than layerwise's."""
    from mcu.hostlib import HostKernels
    from mcu.tflite_schedule import row_tiled, steps
    from mcu.tflite_views import attention_views

    g = lower_tflite(FIXTURES / f"{name}.tflite")
    v = attention_views(g)
    s = row_tiled(v, rows)
    lw = layerwise(g)
    pl, ps = plan(lw), plan(s)
    check(ps, s)
    assert ps.arena_bytes < pl.arena_bytes
    chained = {v.ops[i].kind for st in steps(v) if st[0] == "chain" for i in st[1]}
    assert {"tfl_matmul", "fully_connected", "tfl_softmax"} <= chained
    if name == "bert64":
        assert s.params["in_place"], "the residual stream is written in place"
    ck = HostKernels("dsp")
    for x in fixture_inputs(g, 2, seed=rows):
        want = run(lw, {"input": x}, pl)["output"]
        assert np.array_equal(run(s, {"input": x}, ps)["output"], want)
        assert np.array_equal(run(s, {"input": x}, ps, kernels=ck)["output"], want)


def test_in_place_only_when_the_input_is_not_read_later():
    """A chain output takes its input's bytes only when nothing after the chain reads that input: with a
    second output copying bert64's first layer output at the very end, the second layer writes its own
    buffer, and the schedule still equals layerwise on both outputs."""
    from dataclasses import replace

    from mcu import kernels as K
    from mcu.graph import Op, Tensor
    from mcu.tflite_schedule import in_place, row_tiled, steps
    from mcu.tflite_views import attention_views

    g = attention_views(lower_tflite(FIXTURES / "bert64.tflite"))
    roots = in_place(g, steps(g))
    first = [o for o, x in roots.items() if x == "input"]
    assert len(first) == 2, "both layers write the residual stream over the input"
    layer1 = next(o for o in first if any(o in op.inputs for op in g.ops if op.kind == "tfl_matmul" or
                                          op.kind == "fully_connected"))
    t = g.tensors[layer1]
    tensors = dict(g.tensors)
    tensors["copy.dims"] = Tensor("copy.dims", (2 * K.PERMUTE_DIMS,), "int32", "const", None,
                                  K.permute_dims(t.shape, [int(np.prod(t.shape[k + 1:])) for k in range(len(t.shape))]))
    tensors["copy"] = replace(t, name="copy", kind="output")
    g2 = replace(g, tensors=tensors, outputs=g.outputs + ["copy"],
                 ops=g.ops + [Op("permute", "copy", [layer1, "copy.dims"], ["copy"],
                                 dict(offset=0, nd=K.PERMUTE_DIMS, n=int(np.prod(t.shape))))])
    roots2 = in_place(g2, steps(g2))
    assert roots2 == {layer1: "input"}
    s, lw = row_tiled(g2, 4), layerwise(g2)
    ps, pl = plan(s), plan(lw)
    check(ps, s)
    for x in fixture_inputs(g, 2, seed=2):
        a, b = run(s, {"input": x}, ps), run(lw, {"input": x}, pl)
        assert all(np.array_equal(a[n], b[n]) for n in g2.outputs)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_attention_block_in_any_layout_equals_micro(data):
    """An attention block written with either adj_y choice for q k^T and for p v (so other TRANSPOSE chains
    in front of the matmuls), any number of heads and head width, residual added: the row-block
    schedule after the view passes (a checked plan) gives TFLite Micro's outputs bit for bit."""
    from mcu.tflite_schedule import search_rows

    d = data.draw
    L, h, dh = d(st.integers(2, 12)), d(st.integers(1, 3)), d(st.integers(1, 8))
    D = h * dh
    adj_qk, adj_pv = d(st.booleans()), d(st.booleans())
    b = Builder("attention")
    xq = q(d)
    x = b.input("input", (1, L, D), np.int8, xq)

    def fc(t, tq, name):
        w, wq, ws = weights(d, (D, D))
        bias = np.random.default_rng(3).integers(-2000, 2000, D).astype(np.int32)
        out = q(d)
        y = b.fully_connected(t, b.const(f"{name}.w", w, quant=wq), b.const(
            f"{name}.b", bias, quant=Quant(tuple(tq.scale[0] * v for v in ws), (0,) * D)), name=name, out_quant=out)
        return y, out

    def split(t):
        return b.transpose(b.reshape(t, (1, L, h, dh)), (0, 2, 1, 3))

    (qt, _), (kt, _), (vt, _) = fc(x, xq, "q"), fc(x, xq, "k"), fc(x, xq, "v")
    k = split(kt) if adj_qk else b.transpose(split(kt), (0, 1, 3, 2))
    s = b.batch_matmul(split(qt), k, adj_y=adj_qk, out_quant=q(d))
    p = b.softmax(s, out_quant=Quant.per_tensor(1 / 256, -128))
    v = b.transpose(split(vt), (0, 1, 3, 2)) if adj_pv else split(vt)
    ctx = b.reshape(b.transpose(b.batch_matmul(p, v, adj_y=adj_pv, out_quant=q(d)), (0, 2, 1, 3)), (1, L, D))
    cq = b.quant(ctx)
    o, _ = fc(ctx, cq, "o")
    model = b.finish([b.add(x, o, out_quant=q(d))])
    g = lower_tflite(model)
    sched = search_rows(g)
    p_ = plan(sched)
    check(p_, sched)
    assert not any(op.kind == "permute" for op in sched.graph.ops), "every head is read and written in place"
    mi = MicroInterpreter(model)
    for xv in inputs(d, (1, L, D), n=2):
        ours = run(sched, {"input": quantise_input(g, xv)}, p_)["output"]
        assert np.array_equal(ours.reshape(-1), np.asarray(mi.run(xv)).reshape(-1))

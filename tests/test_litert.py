"""Linear-layer export to .tflite, the LiteRT / TFLite Micro runners, and flatbuffer validation."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from base.errors import TinyshieldError
from edge.litert import (Interpreter, MicroInterpreter, export_linear, export_linear_stack, quantize_linear_stack,
                         tflm_arena_bytes, validate)
from edge.litert.validate import op_names


def _layers(rng, sizes=(16, 32, 24, 8)):
    return [(rng.normal(size=(o, i)).astype(np.float32) / np.sqrt(i), rng.normal(size=o).astype(np.float32))
            for i, o in zip(sizes[:-1], sizes[1:])]


def _numpy_stack(layers, x, relu):
    for k, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if relu and k < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def test_single_linear_fp32_matches_numpy():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    model = export_linear(w, b, batch_shape=(3,))
    assert model[4:8] == b"TFL3"
    assert op_names(validate(model)) == ["FULLY_CONNECTED"]
    x = rng.normal(size=(3, 7)).astype(np.float32)
    np.testing.assert_allclose(Interpreter(model, threads=1).run(x), x @ w.T + b, atol=1e-5)
    # no bias, from a file path, with a 3-D batch shape
    model = export_linear(w, None, batch_shape=(2, 3))
    x3 = rng.normal(size=(2, 3, 7)).astype(np.float32)
    np.testing.assert_allclose(Interpreter(model, threads=2).run(x3), x3 @ w.T, atol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
def test_linear_stack_fp32_matches_numpy(relu, tmp_path):
    rng = np.random.default_rng(1)
    layers = _layers(rng)
    path = tmp_path / "stack.tflite"
    path.write_bytes(export_linear_stack(layers, (4,), relu=relu))
    x = rng.normal(size=(4, 16)).astype(np.float32)
    np.testing.assert_allclose(Interpreter(path).run(x), _numpy_stack(layers, x, relu), atol=1e-5)


def test_linear_stack_accepts_torch_linear():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lins = [torch.nn.Linear(6, 10), torch.nn.Linear(10, 3)]
    model = export_linear_stack(lins, (2,), relu=True)
    x = torch.randn(2, 6)
    with torch.no_grad():
        ref = lins[1](torch.relu(lins[0](x))).numpy()
    np.testing.assert_allclose(Interpreter(model).run(x.numpy()), ref, atol=1e-5)


def test_int8_stack_matches_reference_in_litert_and_tflm():
    rng = np.random.default_rng(2)
    layers = _layers(rng)
    q = quantize_linear_stack(layers, calib=rng.normal(size=(256, 16)), relu=True)
    model = q.export((64,))
    names = op_names(validate(model))
    assert names == ["FULLY_CONNECTED"] * 3
    x = rng.normal(size=(64, 16)).astype(np.float32)
    xq = q.quantize_input(x)
    ref = q.reference(xq)
    assert ref.dtype == np.int8 and len(np.unique(ref)) > 20  # a non-trivial output
    # TFLite Micro rounds like base.quant (twice): bit for bit
    run = MicroInterpreter(model).run_full(xq)
    np.testing.assert_array_equal(run.outputs[0], ref)
    # LiteRT's reference kernels round once (TFLITE_SINGLE_ROUNDING): bit for bit with that variant
    np.testing.assert_array_equal(Interpreter(model, reference_kernels=True).run(xq), q.reference(xq, "single"))
    # its optimised kernels and XNNPACK: within one LSB of either
    for xnnpack in (True, False):
        assert np.abs(Interpreter(model, xnnpack=xnnpack).run(xq).astype(int) - ref).max() <= 1
    assert 0 < run.arena_bytes < 64 * 1024
    assert tflm_arena_bytes(model) == run.arena_bytes
    # and the int8 result tracks the float stack
    err = np.abs(q.dequantize_output(ref) - _numpy_stack(layers, x, True)).max()
    assert err < 0.1 * np.abs(_numpy_stack(layers, x, True)).max()


def test_int8_stack_float_io():
    rng = np.random.default_rng(3)
    layers = _layers(rng, (8, 16, 4))
    q = quantize_linear_stack(layers, calib=rng.normal(size=(128, 8)))
    model = q.export((2,), float_io=True)
    assert op_names(validate(model)) == ["QUANTIZE", "FULLY_CONNECTED", "FULLY_CONNECTED", "DEQUANTIZE"]
    x = rng.normal(size=(2, 8)).astype(np.float32)
    y = Interpreter(model, reference_kernels=True).run(x)
    # the integer part is exact; DEQUANTIZE computes scale * (q - zp) in float32
    np.testing.assert_allclose(y, q.dequantize_output(q.reference(q.quantize_input(x), "single")),
                               rtol=1e-6, atol=1e-7)


def test_bad_layer_stacks_are_refused():
    rng = np.random.default_rng(4)
    with pytest.raises(TinyshieldError, match="layer 1 takes 5 features but layer 0 gives 4"):
        export_linear_stack([(np.zeros((4, 3)), None), (np.zeros((2, 5)), None)])
    with pytest.raises(TinyshieldError, match="empty layer stack"):
        export_linear_stack([])
    with pytest.raises(TinyshieldError, match="bias shape"):
        export_linear(rng.normal(size=(4, 3)), np.zeros(3))
    with pytest.raises(TinyshieldError, match="calibration set is empty"):
        quantize_linear_stack([(np.ones((2, 3)), None)], calib=np.zeros((0, 3)))


def test_wrong_input_shape_and_missing_file(tmp_path):
    model = export_linear(np.ones((2, 3), np.float32))
    with pytest.raises(TinyshieldError, match=r"has shape \(1, 3\), got \(1, 4\)"):
        Interpreter(model).run(np.zeros((1, 4), np.float32))
    with pytest.raises(TinyshieldError, match="not found"):
        Interpreter(tmp_path / "nope.tflite")
    with pytest.raises(TinyshieldError, match="threads must be >= 1"):
        Interpreter(model, threads=0)


@pytest.mark.parametrize("runner", [Interpreter, MicroInterpreter])
def test_truncated_file_is_a_clear_error(runner):
    model = export_linear_stack(_layers(np.random.default_rng(5)), (2,), relu=True)
    for n in (0, 3, 8, 100, len(model) // 2, len(model) - 1):
        with pytest.raises(TinyshieldError, match="not a valid .tflite model"):
            runner(model[:n])
    with pytest.raises(TinyshieldError, match="file identifier"):
        runner(b"\x00" * 4 + b"XXXX" + model[8:])


@pytest.mark.slow
def test_random_corruption_never_crashes_the_process():
    """Random byte flips: every model either runs or raises TinyshieldError — the interpreter
    process must never die (a segfault would end the subprocess with a signal)."""
    code = textwrap.dedent("""
        import numpy as np
        from base.errors import TinyshieldError
        from edge.litert import Interpreter, MicroInterpreter, export_linear_stack, quantize_linear_stack
        rng = np.random.default_rng(7)
        layers = [(rng.normal(size=(32, 16)), rng.normal(size=32)), (rng.normal(size=(4, 32)), rng.normal(size=4))]
        models = [export_linear_stack(layers, (2,), relu=True),
                  quantize_linear_stack(layers, rng.normal(size=(64, 16)), True).export((2,))]
        counts = [0, 0]
        for model in models:
            for runner in (Interpreter, MicroInterpreter):
                for _ in range(150):
                    b = bytearray(model)
                    for _ in range(rng.integers(1, 6)):
                        b[rng.integers(0, len(b))] = rng.integers(0, 256)
                    try:
                        runner(bytes(b)).run(np.zeros((2, 16), np.float32))
                        counts[0] += 1
                    except TinyshieldError:
                        counts[1] += 1
        print("ran", counts[0], "refused", counts[1])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    ran, refused = (int(v) for v in r.stdout.split()[1::2])
    assert ran + refused == 600 and refused > 100

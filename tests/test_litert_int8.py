"""int8 export of whole models (hybrid and full), in LiteRT and TFLite Micro."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from base.errors import TinyshieldError
from edge.litert import Interpreter, MicroInterpreter, tflm_arena_bytes, validate
from edge.litert.export import build_model, export_model
from edge.litert.int8 import FFN_OUT, bert_tiny_int8_encoder, calibration_set, export_int8
from edge.litert.quantize import calibrate, op_summary, quantize_graph
from edge.models.bert import BertClassifier, BertConfig
from edge.models.vit import ViT, ViTConfig

SMALL = dict(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
             max_position_embeddings=32)


def _classifier(seed=0):
    torch.manual_seed(seed)
    return BertClassifier(BertConfig(**SMALL)).eval()


def test_hybrid_bert_classifier_tracks_fp32_in_litert_and_tflm():
    model = _classifier()
    L = 32
    calib = calibration_set("random", n=8, seq_len=L, vocab_size=500)
    fp = build_model(model, seq_len=L, gelu="sigmoid")
    q = quantize_graph(fp, calibrate(fp, calib), "hybrid", wide_modules=FFN_OUT)
    summary = op_summary(q)
    # per layer q, k, v, attention out, intermediate in int8; the FFN output projection 16x8; + classifier
    assert summary["FULLY_CONNECTED"] == {"int8": 11, "int16": 2}
    assert summary["BATCH_MATMUL"] == {"int8": 4} and summary["SOFTMAX"] == {"float32": 2}
    int8_bytes, fp_bytes = q.finish(), fp.finish()
    assert len(int8_bytes) < 0.5 * len(fp_bytes)
    ref, lite, micro = Interpreter(fp_bytes), Interpreter(int8_bytes), MicroInterpreter(int8_bytes)
    for x in calibration_set("random", n=4, seq_len=L, vocab_size=500, seed=1):
        y = ref.run(x)
        assert np.linalg.norm(lite.run(x) - y) < 0.1 * np.linalg.norm(y)
        np.testing.assert_allclose(micro.run(x), lite.run(x), atol=1e-2 * np.abs(y).max())


def test_full_int8_encoder_runs_in_tflm_with_a_measured_arena():
    torch.manual_seed(0)
    L, d = 32, 64
    enc = bert_tiny_int8_encoder(L, model=BertClassifier(BertConfig(**SMALL)).eval())
    m = validate(enc)
    sg = m.subgraphs[0]
    assert sg.tensors[sg.inputs[0]].type == 2 and sg.tensors[sg.outputs[0]].type == 9  # int32 ids -> int8 hidden
    x = calibration_set("random", n=1, seq_len=L, vocab_size=500, seed=3)[0]
    lite, micro = Interpreter(enc, xnnpack=False).run(x), MicroInterpreter(enc).run_full(x)
    assert lite.shape == (1, L, d) and lite.dtype == np.int8
    # the same integer kernels in both runtimes, up to rounding of a few LUT/requantisation steps
    diff = np.abs(lite.astype(np.int32) - micro.outputs[0].astype(np.int32))
    assert diff.max() <= 3 and diff.mean() < 0.1
    # at least the three L x d int8 activations a block must keep live, well under the fp32 graph's
    assert 3 * L * d < micro.arena_bytes == tflm_arena_bytes(enc)
    fp_arena = tflm_arena_bytes(export_model(BertClassifier(BertConfig(**SMALL)).bert, seq_len=L,
                                             head="hidden", gelu="sigmoid"))
    assert micro.arena_bytes < fp_arena / 2


def test_default_bert_tiny_encoder_arena_at_L64():
    enc = bert_tiny_int8_encoder(64)   # BertConfig defaults: 2 x 128, FFN 512, random weights
    arena = tflm_arena_bytes(enc)
    assert 3 * 64 * 128 < arena < 400_000


@pytest.mark.parametrize("mode", ["hybrid", "full"])
def test_vit_int8_agrees_with_fp32(mode):
    torch.manual_seed(0)
    model = ViT(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.rand(1, 1, 28, 28, generator=g).numpy() for _ in range(8)]
    q = Interpreter(export_int8(model, calib, batch=4, mode=mode))
    x = torch.rand(4, 1, 28, 28, generator=g).numpy()
    y = Interpreter(export_model(model, batch=4)).run(x)
    assert np.linalg.norm(q.run(x) - y) < 0.1 * np.linalg.norm(y)


def test_int8_bad_input_is_refused():
    model = _classifier()
    with pytest.raises(TinyshieldError, match="calibration set is empty"):
        export_int8(model, [], seq_len=8)
    fp = build_model(model, seq_len=8)
    with pytest.raises(TinyshieldError, match="unknown int8 mode"):
        quantize_graph(fp, {}, mode="int4")
    with pytest.raises(TinyshieldError, match="was not seen during calibration"):
        quantize_graph(fp, {}, mode="hybrid")
    with pytest.raises(TinyshieldError, match="unknown calibration set"):
        calibration_set("imagenet", seq_len=8)
    with pytest.raises(TinyshieldError, match="needs a sequence length"):
        calibration_set("random")


def test_tflm_long_int8_softmax_is_refused_not_a_crash():
    """TFLite Micro's int8 softmax aborts the process on a row of >= 512 tied maxima (the exp sum
    reaches 2^9 and a rounding shift of 32 fails gemmlowp's check). The runner refuses such graphs
    unless told the inputs are safe; the abort itself is shown in a subprocess."""
    import subprocess
    import sys
    import textwrap

    from edge.litert.writer import Builder, Quant
    b = Builder("softmax512")
    x = b.input("x", (1, 512), np.int8, Quant.per_tensor(0.1, 0))
    model = b.finish([b.softmax(x, out_quant=Quant.per_tensor(1 / 256, -128))])
    with pytest.raises(TinyshieldError, match="int8 SOFTMAX over 512 entries"):
        MicroInterpreter(model)
    varied = np.arange(-128, 384, dtype=np.int64).clip(-128, 127).astype(np.int8)[None]
    assert MicroInterpreter(model, long_softmax=True).run(varied).shape == (1, 512)
    code = textwrap.dedent(f"""
        import numpy as np
        from edge.litert import MicroInterpreter
        MicroInterpreter(bytes.fromhex("{model.hex()}"), long_softmax=True).run(np.zeros((1, 512), np.int8))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode != 0   # the native abort the guard exists for


@pytest.mark.parametrize("runner", ["litert", "tflm"])
def test_float_inputs_are_quantised_as_the_runtimes_quantize_does(runner):
    """`run --backend litert|tflm` quantises a float input for an int8-input model itself: it must give what the
    runtime's own QUANTIZE op gives. Ties (x / scale = k + 0.5) are where runtimes differ: TFLite Micro's
    reference kernel rounds them away from zero, LiteRT's optimised kernel to even."""
    from edge.litert import Interpreter, MicroInterpreter
    from edge.litert.runtime import quantise_input
    from edge.litert.writer import Builder, Quant
    scale, zp = 0.5, 3
    b = Builder("quantize")
    x = b.input("x", (1, 64), np.float32)
    model = b.finish([b.quantize(x, Quant.per_tensor(scale, zp))])
    ties = (np.arange(-16, 16, dtype=np.float32) + 0.5) * scale        # every one a tie
    rnd = np.random.default_rng(0).normal(0, 40, 32).astype(np.float32)
    xs = np.concatenate([ties, rnd])[None]
    interp = Interpreter(model) if runner == "litert" else MicroInterpreter(model)
    want = np.asarray(interp.run(xs))
    detail = {"dtype": np.int8, "quantization_parameters": {"scales": [scale], "zero_points": [zp]}}
    rule = "even" if runner == "litert" else "away"
    got = quantise_input(xs, detail, rule)
    assert got.dtype == np.int8 and np.array_equal(got, want)
    other = quantise_input(xs, detail, "away" if rule == "even" else "even")
    assert not np.array_equal(other, want)       # the rule matters on ties: the test would see a wrong one

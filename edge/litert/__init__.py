"""Export tinyshield models to .tflite and run them in LiteRT and TFLite Micro (no TensorFlow).

Quick reference
---------------
Linear layers (weights as in torch: w is (out, in)):

    from edge.litert import export_linear_stack, Interpreter
    model = export_linear_stack([(w1, b1), (w2, b2)], batch_shape=(1,), relu=True)   # fp32 bytes
    y = Interpreter(model, threads=2).run(x)          # x: float32 (1, in) -> y: (1, out)

int8 linear stack (per-channel int8 weights, int32 bias, fixed point of base.quant):

    q = quantize_linear_stack([(w1, b1), (w2, b2)], calib=x_calib, relu=True)
    model = q.export((1,))                            # int8 in, int8 out
    y8 = MicroInterpreter(model).run(q.quantize_input(x))   # == q.reference(...) bit for bit

Whole models (edge.litert.export / edge.litert.int8), lowered from the graph torch.export captures:

    from edge.litert.export import export_captured, export_model
    from edge.litert.int8 import calibration_set, export_int8, bert_tiny_int8_encoder
    fp32 = export_model(load_minilm(), seq_len=128)                # int32 ids (1, 128) -> (1, 384)
    fp32 = export_captured(edge.capture.load("model.pt2", batch_one=False))   # any captured model
    int8 = export_int8(vit, calibration_set("mnist"), batch=100)   # hybrid: int8 matmuls, float rest
    enc = bert_tiny_int8_encoder(seq_len=128)                      # full int8, for TFLite Micro
    tflm_arena_bytes(enc)                                          # -> 281,888

Runners: `Interpreter(bytes_or_path, threads=None, xnnpack=True)` (ai-edge-litert, or
tflite_runtime when only that is installed) and `MicroInterpreter(bytes_or_path)` (tflite-micro;
`.run_full(x).arena_bytes` is the arena the recording allocator reports); `tflm_arena_bytes(model)`.
Both validate the flatbuffer first: a truncated or corrupt file raises TinyshieldError.

int8 rounding: TFLite Micro requantises like base.quant (double rounding) and matches
`QuantizedStack.reference(x)` bit for bit; LiteRT's reference kernels (`reference_kernels=True`)
and XNNPACK round once and matched `reference(x, "single")` bit for bit on the benchmark's stack;
LiteRT's optimised (ruy) kernels sit in between, within 1 LSB of both.

Writers: `edge.litert.writer.Builder` (a shape-tracking graph builder over the flatbuffer object
API) and `edge.litert.validate.validate(bytes) -> ModelT`.
"""
from edge.litert.linear import QuantizedStack, export_linear, export_linear_stack, quantize_linear_stack
from edge.litert.runtime import Interpreter, MicroInterpreter, tflm_arena_bytes
from edge.litert.validate import validate

__all__ = ["Interpreter", "MicroInterpreter", "QuantizedStack", "export_linear", "export_linear_stack",
           "quantize_linear_stack", "tflm_arena_bytes", "validate"]

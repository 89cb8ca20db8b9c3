"""The .tflite flatbuffer schema (object API), as shipped inside the installed runtimes.

ai-edge-litert carries the newest `schema_py_generated`; tflite-micro carries a copy too. Either
is enough to write and read models, so no TensorFlow is needed.
"""
from __future__ import annotations

try:
    from ai_edge_litert import schema_py_generated as fb
except ImportError:  # pragma: no cover - only without ai-edge-litert
    try:
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb
    except ImportError as e:
        from base.errors import TinyshieldError
        raise TinyshieldError(
            "no .tflite schema found: pip install ai-edge-litert (or tflite-micro)") from e

import numpy as np

IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3

TENSOR_TYPES = {
    np.dtype(np.float32): fb.TensorType.FLOAT32,
    np.dtype(np.int8): fb.TensorType.INT8,
    np.dtype(np.uint8): fb.TensorType.UINT8,
    np.dtype(np.int16): fb.TensorType.INT16,
    np.dtype(np.int32): fb.TensorType.INT32,
    np.dtype(np.int64): fb.TensorType.INT64,
    np.dtype(np.bool_): fb.TensorType.BOOL,
}
NUMPY_TYPES = {v: k for k, v in TENSOR_TYPES.items()}

# builtin code -> name, for error messages and summaries
OP_NAMES = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}

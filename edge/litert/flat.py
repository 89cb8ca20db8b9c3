"""Rewrites of a .tflite flatbuffer that keep its computation: inline external buffers, cut it short.

Both go through the schema's object API (validate first, then ModelT -> Pack), so the result is a
plain, valid .tflite that any interpreter reads.
"""
from __future__ import annotations

import flatbuffers
import numpy as np

from base.errors import TinyshieldError
from edge.litert.schema import IDENTIFIER
from edge.litert.validate import validate


def has_external_buffers(m) -> bool:
    """Constants stored after the flatbuffer (Buffer.offset/size, as ai-edge-quantizer writes them)."""
    return any((b.data is None or not len(b.data)) and (b.offset or 0) > 1 for b in m.buffers or [])


def _pack(m) -> bytes:
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(m.Pack(builder), file_identifier=IDENTIFIER)
    return bytes(builder.Output())


def _inline(m, data: bytes) -> None:
    for b in m.buffers or []:
        if (b.data is None or not len(b.data)) and (b.offset or 0) > 1:
            b.data = np.frombuffer(data[b.offset:b.offset + b.size], np.uint8)
            b.offset, b.size = 0, 0


def inline_buffers(data: bytes, where: str = "model") -> bytes:
    """The same model with every constant inside the flatbuffer. TFLite Micro does not read external
    buffers: it runs such a model on uninitialised arena bytes instead of its weights, silently."""
    m = validate(data, where)
    if not has_external_buffers(m):
        return bytes(data)
    _inline(m, data)
    return _pack(m)


def cut(data: bytes, last: int, where: str = "model") -> bytes:
    """The model up to and including operator `last`, whose first output becomes the model output
    (compare any intermediate tensor with an interpreter that only shows outputs)."""
    m = validate(data, where)
    sg = m.subgraphs[0]
    if not 0 <= last < len(sg.operators or []):
        raise TinyshieldError(f"{where}: no operator {last} (the model has {len(sg.operators or [])})")
    _inline(m, data)
    sg.operators = sg.operators[:last + 1]
    sg.outputs = [int(sg.operators[last].outputs[0])]
    m.signatureDefs = None
    return _pack(m)

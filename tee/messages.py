"""The narrow wire format between client, enclave and accelerator.

Every message is `MAGIC | u32 header length | JSON header | raw array bytes`. The header names the
message kind, its scalar fields and the dtype/shape of each array. `decode` checks all of it against
`SCHEMA` (kind, field names and types, array count and dtypes, exact byte lengths) before anything is
used. No pickle crosses a trust boundary: unpickling bytes from the untrusted accelerator would hand
it code execution inside the enclave.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from base.errors import TinyshieldError

MAGIC = b"TSH1"
MAX_HEADER = 64 * 1024
MAX_MESSAGE = 512 * 1024 * 1024
DTYPES = {"f4": np.float32, "f8": np.float64, "i4": np.int32, "u4": np.uint32, "i8": np.int64, "u1": np.uint8}

# kind -> (scalar fields with their types, number of arrays or None for "any", allowed dtypes)
SCHEMA: dict[str, tuple[dict[str, type], int | None, tuple[str, ...]]] = {
    # enclave <-> accelerator
    "matmul": ({"layer": str, "seq": int}, 1, ("f4", "u1")),   # float32, or blinded digit planes
    "result": ({"seq": int, "seconds": float, "cpu": float, "t_recv": float, "t_send": float}, 1, ("f4", "u4")),
    # the same through shared buffers (tee.dma): the header names dtype and shape, the data is in the buffer
    # (slot: which of the dma.SLOTS parts of each buffer the request and its answer use)
    "matmul_dma": ({"layer": str, "seq": int, "dtype": str, "rows": int, "cols": int, "slot": int}, 0, ()),
    "result_dma": ({"seq": int, "seconds": float, "cpu": float, "t_recv": float, "t_send": float, "dtype": str,
                    "rows": int, "cols": int}, 0, ()),
    "idle": ({}, 0, ()),                          # no more requests for now: the accelerator may stop polling
    # host <-> accelerator (administration, never data from the enclave)
    "transcript": ({}, 0, ()),
    "transcript_data": ({"entries": str}, None, ("f4", "u1")),
    "stats": ({}, 0, ()),
    # kernel: the blinded mode's exact field GEMM kernel (tee.fieldgemm), kernel_note why faster ones were not used
    "stats_data": ({"calls": int, "seconds": float, "backend": str, "kernel": str, "kernel_note": str}, 0, ()),
    "reset_stats": ({}, 0, ()),
    "record": ({"on": int}, 0, ()),
    "ok": ({}, 0, ()),
    "stop": ({}, 0, ()),
    # client <-> enclave
    "attest": ({"nonce": str, "client_key": str}, 0, ()),
    "ping": ({}, 0, ()),                           # answered once the enclave's work between requests is done
    "quote": ({"measurement": str, "nonce": str, "enclave_key": str, "signature": str}, 0, ()),
    "infer": ({"counter": int}, 1, ("u1",)),       # AES-GCM ciphertext of the encoded inputs
    "output": ({"counter": int, "timings": str}, 1, ("u1",)),
    "error": ({"message": str}, 0, ()),
    # plaintext inside the encrypted channel
    "inputs": ({"names": str}, None, ("f4", "i4")),
    "outputs": ({}, 1, ("f4",)),
}


@dataclass
class Message:
    kind: str
    fields: dict = field(default_factory=dict)
    arrays: list = field(default_factory=list)


_CODES = {np.dtype(t): c for c, t in DTYPES.items()}


def code(dtype) -> str:
    """The wire code of a dtype ("u4" for uint32 ...)."""
    c = _CODES.get(np.dtype(dtype))
    if c is None:
        raise TinyshieldError(f"dtype {dtype} cannot be sent (allowed: {', '.join(DTYPES)})")
    return c


def encode(msg: Message) -> bytes:
    check_fields(msg.kind, msg.fields, len(msg.arrays), [code(a.dtype) for a in msg.arrays])
    arrays = [np.ascontiguousarray(a) for a in msg.arrays]
    header = json.dumps({"kind": msg.kind, "fields": msg.fields,
                         "arrays": [[code(a.dtype), list(a.shape)] for a in arrays]}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header] + [a.tobytes() for a in arrays])


def check_fields(kind: str, fields: dict, n_arrays: int, codes: list[str]) -> None:
    if kind not in SCHEMA:
        raise TinyshieldError(f"message kind {kind!r} is not part of the protocol")
    types, count, allowed = SCHEMA[kind]
    if set(fields) != set(types):
        raise TinyshieldError(f"{kind} message has fields {sorted(fields)}, the protocol says {sorted(types)}")
    for name, t in types.items():
        v = fields[name]
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise TinyshieldError(f"{kind}.{name} must be {t.__name__}, got {type(v).__name__}")
    if count is not None and n_arrays != count:
        raise TinyshieldError(f"{kind} message carries {n_arrays} arrays, the protocol says {count}")
    bad = [c for c in codes if c not in allowed]
    if bad:
        raise TinyshieldError(f"{kind} message carries dtype {bad[0]}, allowed: {', '.join(allowed) or 'none'}")


def decode(buf: bytes | bytearray, expect: str | tuple[str, ...] | None = None) -> Message:
    """Parse and validate one message; raises TinyshieldError on anything malformed."""
    if len(buf) < 8 or buf[:4] != MAGIC:
        raise TinyshieldError("malformed message: bad magic")
    (hlen,) = struct.unpack_from("<I", buf, 4)
    if hlen > MAX_HEADER or 8 + hlen > len(buf):
        raise TinyshieldError(f"malformed message: header length {hlen} out of range")
    try:
        header = json.loads(bytes(buf[8:8 + hlen]))
        kind, fields, specs = header["kind"], header["fields"], header["arrays"]
    except (ValueError, KeyError, TypeError) as e:
        raise TinyshieldError(f"malformed message header ({e})") from e
    if expect is not None and kind not in ((expect,) if isinstance(expect, str) else expect):
        if kind == "error":
            raise TinyshieldError(fields.get("message", "peer reported an error"))
        raise TinyshieldError(f"protocol violation: expected {expect}, got {kind!r}")
    if not isinstance(fields, dict) or not isinstance(specs, list):
        raise TinyshieldError("malformed message header: fields/arrays have the wrong type")
    codes = []
    for spec in specs:
        if (not isinstance(spec, list) or len(spec) != 2 or spec[0] not in DTYPES or not isinstance(spec[1], list)
                or not all(isinstance(d, int) and 0 <= d < 2 ** 31 for d in spec[1])):
            raise TinyshieldError(f"malformed array spec {spec!r}")
        codes.append(spec[0])
    check_fields(kind, fields, len(specs), codes)
    arrays, pos = [], 8 + hlen
    for code, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[code]).itemsize
        if pos + n > len(buf):
            raise TinyshieldError(f"truncated {kind} message: array needs {n} bytes, {len(buf) - pos} left")
        arrays.append(np.frombuffer(buf, dtype=DTYPES[code], count=n // np.dtype(DTYPES[code]).itemsize,
                                    offset=pos).reshape(shape))
        pos += n
    if pos != len(buf):
        raise TinyshieldError(f"{kind} message has {len(buf) - pos} trailing bytes")
    return Message(kind, fields, arrays)


def send(conn, msg: Message) -> int:
    data = encode(msg)
    conn.send_bytes(data)
    return len(data)


def recv(conn, expect=None) -> Message:
    try:
        # A bytearray, so decoded arrays are writable (torch.from_numpy warns on read-only memory).
        data = bytearray(conn.recv_bytes(MAX_MESSAGE))
    except EOFError as e:
        raise TinyshieldError("the peer process closed the connection (it crashed or was stopped)") from e
    except OSError as e:  # recv_bytes raises OSError for messages above maxlength
        raise TinyshieldError(f"message refused: {e}") from e
    return decode(data, expect)

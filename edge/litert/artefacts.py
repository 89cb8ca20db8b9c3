""".tflite files of tinyshield models: export options, metadata in the file, and a cache.

The file's `description` holds a small JSON (`{"tinyshield": {...}}`): model kind, input kind, L,
int8 mode, labels — so `tinyshield run model.tflite ...` knows how to feed and read it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from base.errors import TinyshieldError
from base.paths import artefact_dir

TEXT_KINDS = ("minilm", "bert", "bert-classifier")
DEFAULT_SEQ_LEN = 128


@dataclass
class ExportOptions:
    int8: bool = False
    mode: str = "hybrid"            # int8 graph: hybrid | full
    calib: str | None = None        # sst2 | mnist | random (default: sst2 for text, mnist for images)
    calib_n: int = 32
    seq_len: int | None = None      # text models (default 128)
    batch: int = 1
    gelu: str = "exact"             # exact | tanh | sigmoid (TFLite Micro has no GELU kernel)
    head: str = "sentence"          # BertModel / MiniLM output: sentence | mean | hidden


def base_kind(kind: str) -> str:
    """The model family of a kind: a CLR-compressed "bert-classifier-clr" is a "bert-classifier"."""
    return kind.removesuffix("-clr")


def default_seq_len(model) -> int:
    """DEFAULT_SEQ_LEN, or fewer when the model's position table is shorter (a compressed model keeps
    only the rows it is deployed with)."""
    cfg = getattr(model, "config", None) or getattr(getattr(model, "bert", None), "config", None)
    return min(DEFAULT_SEQ_LEN, getattr(cfg, "max_position_embeddings", DEFAULT_SEQ_LEN))


def _kind_is_text(kind: str) -> bool:
    return base_kind(kind) in TEXT_KINDS


def export_loaded(loaded, opts: ExportOptions) -> bytes:
    """.tflite bytes of a `registry.Loaded` model under `opts`, with metadata in the description."""
    from edge.litert.export import build_model
    from edge.litert.int8 import calibration_set, export_int8

    text = _kind_is_text(loaded.kind)
    seq_len = (opts.seq_len or default_seq_len(loaded.model)) if text else None
    if opts.batch < 1:
        raise TinyshieldError(f"batch must be >= 1, got {opts.batch}")
    calib = None
    calib_name = None
    if opts.int8:
        calib_name = opts.calib or ("sst2" if text else "mnist")
        if (text and calib_name == "mnist") or (not text and calib_name in ("sst2", "random")):
            raise TinyshieldError(f"--calib {calib_name} does not fit a {loaded.kind} model "
                                  f"(use {'sst2 or random' if text else 'mnist'})")
        vocab = getattr(getattr(loaded.model, "config", None), "vocab_size", 30522)
        calib = calibration_set(calib_name, n=opts.calib_n, seq_len=seq_len, vocab_size=vocab)
    meta = {"kind": loaded.kind, "input": "ids" if text else "image", "seq_len": seq_len, "batch": opts.batch,
            "int8": opts.mode if opts.int8 else None, "calib": calib_name, "gelu": opts.gelu,
            "head": opts.head if base_kind(loaded.kind) in ("minilm", "bert") else "logits",
            "labels": loaded.config.get("labels")}
    desc = json.dumps({"tinyshield": meta})
    if opts.int8:
        return export_int8(loaded.model, calib, seq_len=seq_len, batch=opts.batch, mode=opts.mode,
                           gelu=opts.gelu, head=opts.head, description=desc)
    return build_model(loaded.model, seq_len, opts.batch, opts.gelu, opts.head).finish(description=desc)


def export_pt2(path: str | Path, opts: ExportOptions) -> bytes:
    """.tflite bytes of a saved ExportedProgram (.pt2) at its own example's shapes (the batch too). int8
    calibrates on `opts.calib`: a .npy/.npz file of batch-first inputs (array `x` in a .npz)."""
    import numpy as np

    from edge.capture import load
    from edge.litert.export import build_captured
    from edge.litert.int8 import FFN_OUT
    from edge.litert.quantize import calibrate, quantize_graph

    cap = load(path, batch_one=False)
    x0 = cap.example[0]
    meta = {"kind": "pt2", "input": "ids" if not x0.is_floating_point() else "tensor",
            "seq_len": int(x0.shape[1]) if not x0.is_floating_point() and x0.ndim == 2 else None,
            "batch": int(x0.shape[0]), "int8": opts.mode if opts.int8 else None, "calib": opts.calib,
            "gelu": opts.gelu, "head": "output", "labels": None}
    b = build_captured(cap, opts.gelu, Path(path).stem)
    if opts.int8:
        if not opts.calib or not str(opts.calib).endswith((".npy", ".npz")):
            raise TinyshieldError("a .pt2 model calibrates on your data: --calib calib.npy (batch-first inputs, "
                                  "or array x of a .npz)")
        from base.data import load_array
        xs = load_array(opts.calib, "x")
        B = int(x0.shape[0])
        if tuple(xs.shape[1:]) != tuple(x0.shape[1:]) or len(xs) < B:
            raise TinyshieldError(f"{opts.calib}: inputs of shape {tuple(xs.shape)} do not fit the model's input "
                                  f"{tuple(x0.shape)} (batch-first, at least {B})")
        dtype = np.int32 if not x0.is_floating_point() else np.float32
        calib = [xs[i:i + B].astype(dtype) for i in range(0, len(xs) - B + 1, B)][:opts.calib_n]
        b = quantize_graph(b, calibrate(b, calib), opts.mode, wide_modules=FFN_OUT)
    return b.finish(description=json.dumps({"tinyshield": meta}))


def read_meta(model) -> dict:
    """The tinyshield metadata of a validated ModelT (empty for foreign .tflite files)."""
    d = model.description
    d = d.decode(errors="replace") if isinstance(d, bytes) else (d or "")
    try:
        return json.loads(d).get("tinyshield", {})
    except (json.JSONDecodeError, AttributeError):
        return {}


def model_key(spec: str) -> dict:
    """What identifies a model for the cache: its name, or its directory and weights' stamp."""
    p = Path(spec)
    if p.is_dir():
        w = p / "model.safetensors"
        st = w.stat() if w.is_file() else None
        return {"dir": str(p.resolve()), "size": st and st.st_size, "mtime": st and st.st_mtime_ns}
    return {"name": spec}


def tflite_for(spec: str, opts: ExportOptions, force: bool = False) -> Path:
    """Path of the cached .tflite of model `spec` (recipe name, 'minilm' or model dir) under `opts`."""
    from edge.models.registry import resolve
    d = artefact_dir("tflite", {"model": model_key(spec), **asdict(opts)})
    out = d / "model.tflite"
    if out.is_file() and not force:
        return out
    data = export_loaded(resolve(spec), opts)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out

"""`tinyshield run --backend torch|litert|tflm MODEL INPUT...`: one inference per input on this machine.

MODEL is a recipe name, 'minilm', a model directory, or a .tflite file (litert/tflm). Models are
exported on first use and cached (build/tflite/<hash>/). TFLite Micro has no GELU kernel, so for
--backend tflm the export uses GELU = x * sigmoid(1.702 x) and says so.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from base.errors import TinyshieldError
from tools.inputs import load_image


def _prepare(kind_input: str, inputs: list[str], seq_len: int | None, shape: tuple | None = None):
    """(model inputs, labels or None, display names)."""
    if not inputs:
        raise TinyshieldError("give at least one INPUT (a sentence, or mnist:INDEX / an image file)")
    if kind_input == "tensor":          # a .tflite exported from a .pt2: each INPUT is a .npy of one input
        xs = []
        for s in inputs:
            if not s.endswith(".npy") or not Path(s).is_file():
                raise TinyshieldError(f"input {s!r}: give a .npy file holding one input of shape {shape[1:]}")
            x = np.load(s, allow_pickle=False).astype(np.float32)
            xs.append(x[None] if tuple(x.shape) == tuple(shape[1:]) else x)
        return xs, None, inputs
    if kind_input == "ids":
        from edge.models.minilm import load_tokenizer, tokenize
        b = tokenize(load_tokenizer(), inputs, pad_to=seq_len)
        ids = b.input_ids.numpy().astype(np.int32)
        return [ids[i:i + 1] for i in range(len(inputs))], None, inputs
    from edge.recipes.vit_mnist import to_tensor
    imgs, labels = zip(*(load_image(s) for s in inputs))
    x = to_tensor(np.stack(imgs)).numpy()
    return [x[i:i + 1] for i in range(len(inputs))], list(labels), inputs


def _quantise_in(x: np.ndarray, detail: dict) -> np.ndarray:
    """Feed a foreign int8-input model: quantise with the tensor's own scale/zero point."""
    dt = np.dtype(detail["dtype"])
    if dt in (np.int8, np.uint8) and x.dtype == np.float32:
        qp = detail.get("quantization_parameters", {})
        scale, zp = float(qp["scales"][0]), int(qp["zero_points"][0])
        info = np.iinfo(dt)
        return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dt)
    return x


def _dequantise_out(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]) in (np.int8, np.uint8, np.int16):
        qp = detail.get("quantization_parameters", {})
        return (y.astype(np.float32) - int(qp["zero_points"][0])) * float(qp["scales"][0])
    return y


def _report(meta: dict, names: list[str], outs: list[np.ndarray], labels, times: list[float], header: str) -> None:
    print(header + f": {np.median(times) * 1e3:.1f} ms per inference (median of {len(times)})")
    head = meta.get("head", "logits")
    if head == "output":                # a captured model's own output: shown, not interpreted
        for n, o in zip(names, outs):
            print(f"  {n[:60]!r}: output {tuple(o.shape)}, first {np.array2string(o.reshape(-1)[:6], precision=4)}")
        return
    if head in ("sentence", "mean"):
        embs = np.concatenate([o.reshape(1, -1) for o in outs])
        for n, e in zip(names, embs):
            print(f"  {n[:60]!r}: embedding dim {e.size}, norm {np.linalg.norm(e):.4f}, "
                  f"first {np.array2string(e[:4], precision=4)}")
        if len(embs) > 1:
            u = embs / np.linalg.norm(embs, axis=1, keepdims=True)
            print("  cosine similarity:")
            for n, row in zip(names, u @ u.T):
                print(f"    {n[:30]:30s} " + " ".join(f"{v:6.3f}" for v in row))
        return
    if head == "hidden":
        for n, o in zip(names, outs):
            print(f"  {n[:60]!r}: hidden states {tuple(o.shape)}, mean |h| {np.abs(o).mean():.4f}")
        return
    names_of = meta.get("labels")
    for i, (n, o) in enumerate(zip(names, outs)):
        logits = o.reshape(-1).astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        k = int(p.argmax())
        label = names_of[k] if names_of and k < len(names_of) else str(k)
        truth = f" (true {labels[i]})" if labels and labels[i] is not None else ""
        print(f"  {n[:60]!r}: class {label} p={p[k]:.3f}{truth}")


def _run_torch(args) -> int:
    import torch

    from edge.litert.artefacts import TEXT_KINDS, base_kind, default_seq_len
    from edge.models.bert import with_head
    from edge.models.registry import resolve

    if args.int8:
        raise TinyshieldError("the torch backend runs fp32 only: use --backend litert --int8 (or tflm)")
    if args.model.endswith(".tflite"):
        raise TinyshieldError("a .tflite file runs on --backend litert or tflm, not torch")
    loaded = resolve(args.model)
    kind = base_kind(loaded.kind)
    text = kind in TEXT_KINDS
    xs, labels, names = _prepare("ids" if text else "image", args.inputs, (args.seq_len or default_seq_len(loaded.model)))
    if args.threads:
        torch.set_num_threads(args.threads)
    outs, times = [], []
    with torch.no_grad():
        loaded.model(torch.from_numpy(xs[0]).long()) if text else loaded.model(torch.from_numpy(xs[0]))  # warm-up
        for x in xs:
            t0 = time.perf_counter()
            if text:
                ids = torch.from_numpy(x).long()
                # encoders answer with their sentence embedding, the head the .tflite export uses too
                y = (with_head(loaded.model, "sentence") if kind in ("minilm", "bert") else loaded.model)(ids)
            else:
                y = loaded.model(torch.from_numpy(x))
            times.append(time.perf_counter() - t0)
            outs.append(y.numpy())
    meta = {"head": "sentence" if kind in ("minilm", "bert") else "logits",
            "labels": loaded.config.get("labels")}
    _report(meta, names, outs, labels, times, f"torch fp32 ({torch.get_num_threads()} threads) {args.model}")
    return 0


def run_on_backend(args) -> int:
    """Entry point of `tinyshield run` without --board (see tools/commands/run.py for args)."""
    if args.backend == "torch":
        return _run_torch(args)
    from edge.litert.artefacts import ExportOptions, read_meta, tflite_for
    from edge.litert.runtime import Interpreter, MicroInterpreter
    from edge.litert.validate import validate

    note = ""
    if args.model.endswith(".tflite"):
        path = Path(args.model)
        if args.int8 or args.seq_len:
            raise TinyshieldError("--int8 and --seq-len are fixed inside a .tflite file: export again to change them")
    else:
        gelu = "sigmoid" if args.backend == "tflm" else "exact"
        if gelu == "sigmoid":
            note = " (GELU as x*sigmoid(1.702x): TFLite Micro has no GELU kernel)"
        path = tflite_for(args.model, ExportOptions(int8=args.int8, seq_len=args.seq_len, gelu=gelu))
    if not path.is_file():
        raise TinyshieldError(f"{path}: .tflite file not found")
    data = path.read_bytes()
    meta = read_meta(validate(data, str(path)))
    if args.backend == "litert":
        runner = Interpreter(data, threads=args.threads)
        in_detail, out_detail = runner.inputs[0], runner.outputs[0]
        shape = tuple(int(s) for s in in_detail["shape"])
        label = f"litert ({runner.runtime}, {args.threads or 'default'} threads)"
    else:
        runner = MicroInterpreter(data)
        in_detail, out_detail = runner.interp.get_input_details(0), runner.interp.get_output_details(0)
        shape = tuple(int(s) for s in in_detail["shape"])
        label = "tflm (tflite-micro)"
    kind_input = meta.get("input") or ("ids" if np.dtype(in_detail["dtype"]) == np.int32 and len(shape) == 2
                                       else "image")
    if shape[0] != 1:
        raise TinyshieldError(f"{path}: exported for batch {shape[0]}; `run` feeds one input at a time "
                              "(export with --batch 1)")
    xs, labels, names = _prepare(kind_input, args.inputs, shape[1] if kind_input == "ids" else None, shape)
    outs, times = [], []
    runner.run(_quantise_in(xs[0], in_detail))  # warm-up (first call plans memory / packs weights)
    for x in xs:
        x = _quantise_in(x, in_detail)
        t0 = time.perf_counter()
        y = runner.run(x)
        times.append(time.perf_counter() - t0)
        outs.append(_dequantise_out(np.asarray(y), out_detail))
    precision = f"int8 {meta['int8']}" if meta.get("int8") else ("int8" if np.dtype(in_detail["dtype"]) == np.int8
                                                                 else "fp32")
    _report(meta, names, outs, labels, times, f"{label} {precision} {path}{note}")
    if args.backend == "tflm":
        print(f"  TFLite Micro arena: {runner.arena_bytes:,} bytes")
    return 0

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
from edge.inputs import read_inputs
from edge.litert.runtime import dequantise_output, quantise_input


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
    from edge.models.bert import served
    from edge.models.registry import resolve

    if args.int8:
        raise TinyshieldError("the torch backend runs fp32 only: use --backend litert --int8 (or tflm)")
    if args.model.endswith(".tflite"):
        raise TinyshieldError("a .tflite file runs on --backend litert or tflm, not torch")
    loaded = resolve(args.model)
    kind = base_kind(loaded.kind)
    text = kind in TEXT_KINDS
    xs, labels = read_inputs(args.inputs, "ids" if text else "image", seq_len=args.seq_len or default_seq_len(loaded.model))
    names = args.inputs
    if args.threads:
        torch.set_num_threads(args.threads)
    module = served(loaded.model)
    as_tensor = (lambda x: torch.from_numpy(x).long()) if text else torch.from_numpy
    outs, times = [], []
    with torch.no_grad():
        module(as_tensor(xs[0]))  # warm-up
        for x in xs:
            t0 = time.perf_counter()
            y = module(as_tensor(x))
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
    xs, labels = read_inputs(args.inputs, kind_input, shape, shape[1] if kind_input == "ids" else None)
    xs, names = [x.astype(np.float32) if kind_input == "tensor" else x for x in xs], args.inputs
    outs, times = [], []
    ties = "even" if args.backend == "litert" else "away"   # each runtime's own QUANTIZE rounding
    runner.run(quantise_input(xs[0], in_detail, ties))  # warm-up (first call plans memory / packs weights)
    for x in xs:
        x = quantise_input(x, in_detail, ties)
        t0 = time.perf_counter()
        y = runner.run(x)
        times.append(time.perf_counter() - t0)
        outs.append(dequantise_output(np.asarray(y), out_detail))
    precision = f"int8 {meta['int8']}" if meta.get("int8") else ("int8" if np.dtype(in_detail["dtype"]) == np.int8
                                                                 else "fp32")
    _report(meta, names, outs, labels, times, f"{label} {precision} {path}{note}")
    if args.backend == "tflm":
        print(f"  TFLite Micro arena: {runner.arena_bytes:,} bytes")
    return 0

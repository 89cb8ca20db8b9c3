"""`tinyshield export MODEL --format tflite [--int8 --calib sst2]`: write a .tflite file."""


def register(sub):
    p = sub.add_parser("export", help="export a model to .tflite (fp32 or int8) for LiteRT / TFLite Micro",
                       description="Export MODEL (a recipe name, 'minilm', a model directory or a .pt2 file saved by "
                                   "torch.export.save) to a .tflite file for a fixed batch and sequence length "
                                   "(a .pt2 keeps its example's shapes). Example: "
                                   "tinyshield export minilm --int8 --calib sst2 --seq-len 128 -o minilm-int8.tflite")
    p.add_argument("model", help="recipe name, 'minilm', a model directory (model.safetensors + config.json) "
                                 "or a .pt2 file")
    p.add_argument("--format", default="tflite", choices=["tflite"], help="output format (tflite)")
    p.add_argument("-o", "--output", default=None, help="output file (default: MODEL[-int8].tflite here)")
    p.add_argument("--int8", action="store_true", help="post-training int8 quantisation")
    p.add_argument("--mode", default="hybrid", choices=["hybrid", "full"],
                   help="int8 graph: hybrid = int8 matmuls, float LayerNorm/softmax/GELU (default); "
                        "full = every op with an int8 kernel")
    p.add_argument("--calib", default=None,
                   help="calibration data for --int8: sst2, mnist or random (default: sst2 for text models, mnist "
                        "for images); for a .pt2 model a .npy/.npz file of batch-first inputs")
    p.add_argument("--calib-n", type=int, default=32, help="calibration inputs (default 32)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length L of text models (default 128)")
    p.add_argument("--batch", type=int, default=1, help="batch size baked into the graph (default 1)")
    p.add_argument("--gelu", default="exact", choices=["exact", "tanh", "sigmoid"],
                   help="GELU form: exact (builtin GELU), tanh, or sigmoid = x*sigmoid(1.702x) for TFLite Micro")
    p.add_argument("--head", default="sentence", choices=["sentence", "mean", "hidden"],
                   help="output of encoders without a classifier (minilm): sentence embedding (default), "
                        "mean-pooled, or hidden states")
    p.set_defaults(func=run)


def run(args):
    from pathlib import Path

    from base.errors import TinyshieldError
    from edge.litert.artefacts import ExportOptions, export_loaded, export_pt2
    from edge.litert.validate import op_names, validate
    from edge.models.registry import resolve

    if args.calib_n < 1:
        raise TinyshieldError(f"--calib-n must be >= 1, got {args.calib_n}")
    if args.seq_len is not None and args.seq_len < 1:
        raise TinyshieldError(f"--seq-len must be >= 1, got {args.seq_len}")
    if (args.calib or args.mode != "hybrid") and not args.int8:
        raise TinyshieldError("--calib and --mode only apply with --int8")
    pt2 = args.model.endswith(".pt2")
    if pt2 and (args.seq_len is not None or args.batch != 1):
        raise TinyshieldError("a .pt2 model keeps the shapes of its example input: export it again to change them")
    if not pt2 and args.calib not in (None, "sst2", "mnist", "random"):
        raise TinyshieldError(f"--calib {args.calib}: use sst2, mnist or random (a file is for .pt2 models)")
    opts = ExportOptions(int8=args.int8, mode=args.mode, calib=args.calib, calib_n=args.calib_n,
                         seq_len=args.seq_len, batch=args.batch, gelu=args.gelu, head=args.head)
    data = export_pt2(args.model, opts) if pt2 else export_loaded(resolve(args.model), opts)
    stem = Path(args.model.rstrip("/")).name.removesuffix(".pt2") + ("-int8" if args.int8 else "")
    out = Path(args.output or f"{stem}.tflite")
    if out.parent and not out.parent.is_dir():
        raise TinyshieldError(f"output folder {out.parent} does not exist")
    out.write_bytes(data)
    m = validate(data, str(out))
    ops = op_names(m)
    sg = m.subgraphs[0]
    shape = lambda t: "x".join(str(int(s)) for s in sg.tensors[t].shape)
    print(f"{out}: {len(data) / 1e6:.2f} MB, {len(ops)} ops ({len(set(ops))} kinds), "
          f"input {shape(sg.inputs[0])}, output {shape(sg.outputs[0])}"
          + (f", int8 {opts.mode}" if args.int8 else ", fp32"))

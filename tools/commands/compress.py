"""`tinyshield compress MODEL --budget 0.77M | --flash 1MB`: CLR word embeddings within a budget."""


def register(sub):
    p = sub.add_parser(
        "compress", help="compress a BERT's word embeddings (clustered low-rank) to a parameter or flash budget",
        description="Search cluster assignment and per-cluster ranks of the word-embedding table within the "
                    "budget (token statistics from SST-2 train), fine-tune a classifier briefly, quantise the "
                    "factors to int8, and write the model (safetensors + config.json) and a report.")
    p.add_argument("model", help="bert-tiny-sst2 (recipe), minilm, or a model directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", help="total parameters of the compressed model, e.g. 0.77M or 770000 "
                                         "(decimal: 1M = 1,000,000)")
    g.add_argument("--flash", help="flash bytes of the int8 weights exactly as the board stores them (its runtime "
                                           "and kernels need ~25 KB more), e.g. 1MB or 992KB; binary units: 1KB = 1,024 B, "
                                           "1MB = 1,048,576 B")
    g.add_argument("--embedding-budget", help="parameters of the word table alone, e.g. 1.17M")
    p.add_argument("--out", help="output directory (default: build/compressed/<model>-<budget>/)")
    p.add_argument("--finetune-steps", type=int, default=800,
                   help="recovery training steps for classifiers (default 800; 0 = none)")
    p.add_argument("--augment", type=float, default=1.0,
                   help="weight of the fine-tuning term on training sentences with a rare token substituted in "
                        "(matches the uncompressed model there; default 1; 0 = off)")
    p.add_argument("--euclidean", action="store_true",
                   help="classifiers: rebuild the table in plain (frequency-weighted) error instead of in the "
                        "metric of the model's output sensitivity")
    p.add_argument("--max-len", type=int, default=None,
                   help="keep this many position rows (the longest sequence the model will read); default: the "
                        "recipe's max_len when the model directory records one, else all rows; 0 = all rows")
    p.add_argument("--float", action="store_true", help="keep float32 factors (default: int8 factors)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args):
    import json

    from rich.console import Console
    from rich.table import Table

    from base.sizes import parse_size
    from edge.compress.pipeline import compress_model, recipe_max_len
    from base.errors import TinyshieldError
    from edge.models.registry import resolve
    from base.paths import build_dir

    if args.budget:
        budget, unit, total = parse_size(args.budget, "params"), "params", True
    elif args.flash:
        budget, unit, total = parse_size(args.flash, "bytes"), "bytes", True
    else:
        budget, unit, total = parse_size(args.embedding_budget, "params"), "params", False
    loaded = resolve(args.model)
    max_len = recipe_max_len(loaded.config) if args.max_len is None else (args.max_len or None)
    if args.augment < 0:
        raise TinyshieldError(f"--augment must be >= 0 (0 turns it off), got {args.augment}")
    if max_len is not None and max_len < 0:
        raise TinyshieldError(f"--max-len must be >= 0 (0 keeps every position row), got {max_len}")
    name = args.model.rstrip("/").split("/")[-1]
    tag = (args.budget or args.flash or "emb" + args.embedding_budget).replace(".", "_")
    out = args.out or build_dir() / "compressed" / f"{name}-{tag}"
    report, _ = compress_model(loaded.model, name, budget, unit, total=total, finetune_steps=args.finetune_steps,
                               int8=not args.float, out=out, quiet=args.quiet, max_len=max_len,
                               augment=args.augment, sensitivity=not args.euclidean)
    (build_dir() / "compressed").mkdir(parents=True, exist_ok=True)
    with open(f"{report.path}/report.json", "w") as f:
        json.dump(report.to_dict(), f, indent=2, default=str)

    con = Console(width=max(Console().width, 120))
    t = Table(title=f"{name}: {budget:,} {unit} budget ({'total' if total else 'word table'})")
    for col in ("part", "params before", "params after", "int8 bytes before", "int8 bytes after"):
        t.add_column(col, justify="right" if col != "part" else "left")
    before, after = report.sizes_before, report.sizes_after
    for (kb, vb), (ka, va) in zip(before.items(), after.items()):
        t.add_row(ka, f"{vb['params']:,}", f"{va['params']:,}", f"{vb['int8_bytes']:,}", f"{va['int8_bytes']:,}")
    con.print(t)
    lay = report.layout
    pos = report.positions
    con.print(f"position rows {pos['rows_before']} -> {pos['rows_after']}"
              + (" (the longest sequence the compressed model accepts)" if pos["rows_after"] < pos["rows_before"]
                 else ""))
    con.print(f"layout ({lay['metric']} error): {lay['candidate']}, {len(lay['clusters'])} clusters, ranks "
              + ", ".join(("dense" if c["dense"] else str(c["rank"])) + f"x{c['rows']}" for c in lay["clusters"]))
    con.print("reconstruction: " + ", ".join(f"{k} {v:.4f}" for k, v in report.reconstruction.items()))
    con.print("quality: " + ", ".join(f"{k} {v:.4f}" for k, v in report.quality.items() if isinstance(v, float)))
    con.print(f"lookup per token: up to {report.lookup_cost['max_macs']:,} MACs / "
              f"{report.lookup_cost['max_bytes_read']:,} bytes read; frequency-weighted mean "
              f"{report.lookup_cost['mean_macs']:.0f} MACs")
    con.print(f"wrote {report.path} (model.safetensors, config.json, report.json) in {report.seconds:.0f} s")

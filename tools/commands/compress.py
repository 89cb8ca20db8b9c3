"""`tinyshield compress MODEL --budget 0.77M | --flash 1MB`: CLR word embeddings within a budget;
`--sweep`: budgets x cluster layouts x metrics as Ray Tune trials."""


def register(sub):
    p = sub.add_parser(
        "compress", help="compress a BERT's word embeddings (clustered low-rank) to a parameter or flash budget",
        description="Search cluster assignment and per-cluster ranks of the word-embedding table within the "
                    "budget (token statistics from SST-2 train), fine-tune a classifier briefly, quantise the "
                    "factors to int8, and write the model (safetensors + config.json) and a report.")
    p.add_argument("model", help="bert-tiny-sst2 (recipe), minilm, or a model directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", help="total parameters of the compressed model, e.g. 0.77M or 770000 "
                                         "(decimal: 1M = 1,000,000)")
    g.add_argument("--flash", help="flash bytes of the int8 weights exactly as the board stores them (its runtime "
                                           "and kernels need ~25 KB more), e.g. 1MB or 992KB; binary units: 1KB = 1,024 B, "
                                           "1MB = 1,048,576 B")
    g.add_argument("--embedding-budget", help="parameters of the word table alone, e.g. 1.17M")
    # (one of the three is required; with --sweep each takes a comma-separated list)
    p.add_argument("--out", help="output directory (default: build/compressed/<model>-<budget>/)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="recovery training steps for classifiers (default 800, with --sweep 0; 0 = none)")
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
    sw = p.add_argument_group("sweep (the optional 'fleet' extra, Ray Tune)")
    sw.add_argument("--sweep", action="store_true",
                    help="run every budget x cluster layout x metric as a Ray Tune trial, measured on a slice of "
                         "SST-2 dev: table, JSON, Pareto plot (fidelity vs flash). Budgets: a comma-separated "
                         "--flash/--budget/--embedding-budget (default --flash 768KB,1MB,1.5MB)")
    sw.add_argument("--sweep-layouts", default=None, metavar="L,L,...",
                    help="cluster layouts: bandsB, bandsB-kmeansK or search (the best of the whole family); "
                         "default bands1,bands8,bands16-kmeans4")
    sw.add_argument("--sweep-metrics", default=None, metavar="M,M,...",
                    help="sensitivity and/or euclidean (default: sensitivity, or euclidean with --euclidean)")
    sw.add_argument("--sweep-dev", type=int, default=256, help="SST-2 dev sentences a trial is measured on (default 256)")
    sw.add_argument("--sweep-train", type=int, default=2000,
                    help="SST-2 train sentences for the sensitivity metric and fine-tuning (default 2000; 0 = all)")
    sw.add_argument("--sweep-parallel", type=int, default=None, metavar="N",
                    help="at most N trials at once (default: one per core of the cluster)")
    sw.add_argument("--address", default=None, help="run the trials on this Ray cluster instead of a local one")
    p.set_defaults(func=run)


def _budgets(args) -> tuple[list[int], str, bool, str]:
    """The budget(s) given: values, unit, whether they count the whole model, and the text."""
    from base.errors import TinyshieldError
    from base.sizes import parse_size

    if args.budget:
        text, unit, total = args.budget, "params", True
    elif args.flash:
        text, unit, total = args.flash, "bytes", True
    elif args.embedding_budget:
        text, unit, total = args.embedding_budget, "params", False
    elif args.sweep:
        text, unit, total = "768KB,1MB,1.5MB", "bytes", True
    else:
        raise TinyshieldError("give a budget: --budget PARAMS, --flash BYTES or --embedding-budget PARAMS "
                              "(e.g. --flash 1MB)")
    values = [parse_size(v, unit) for v in text.split(",")]
    if len(values) > 1 and not args.sweep:
        raise TinyshieldError(f"{text!r}: several budgets need --sweep (or give one budget)")
    return values, unit, total, text


def _names(text: str | None) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()] if text else []


def run_sweep(args, loaded, budgets, unit, total, max_len):
    from rich.console import Console

    from base.paths import build_dir
    from edge.compress.sweep import LAYOUTS, compress_sweep, rich_table

    console = Console(width=None if Console().is_terminal else 160)
    name = args.model.rstrip("/").split("/")[-1]
    out = args.out or build_dir() / "sweeps" / f"compress-{name}"
    metrics = _names(args.sweep_metrics) or ["euclidean" if args.euclidean else "sensitivity"]
    with console.status(f"sweeping compression of {name} as Ray Tune trials"):
        res = compress_sweep(loaded.model, name, budgets, unit, out, total=total, layouts=_names(args.sweep_layouts) or LAYOUTS,
                             metrics=metrics, finetune_steps=args.finetune_steps or 0, dev_limit=args.sweep_dev,
                             train_limit=args.sweep_train or None, max_len=max_len, int8=not args.float,
                             augment=args.augment, address=args.address, max_concurrent=args.sweep_parallel)
    console.print(rich_table(res))
    cached = sum(t.cached for t in res.trials)
    console.print(f"{len(res.trials)} trials ({cached} from the cache) in {res.seconds:.1f} s; wrote "
                  f"{res.files['table']}, {res.files['json']}, {res.files['plot']}")
    return 0


def run(args):
    import json

    from rich.console import Console
    from rich.table import Table

    from edge.compress.pipeline import compress_model, recipe_max_len
    from base.errors import TinyshieldError
    from edge.models.registry import resolve
    from base.paths import build_dir

    budgets, unit, total, text = _budgets(args)
    for flag, v in (("--sweep-dev", args.sweep_dev), ("--sweep-train", args.sweep_train),
                    ("--sweep-parallel", args.sweep_parallel)):
        if v is not None and v < (0 if flag == "--sweep-train" else 1):
            raise TinyshieldError(f"{flag} must be >= {0 if flag == '--sweep-train' else 1}, got {v}")
    if args.sweep:
        from base.cluster import require_ray
        require_ray("or drop --sweep to compress to one budget")      # before loading (or training) the model
    loaded = resolve(args.model)
    max_len = recipe_max_len(loaded.config) if args.max_len is None else (args.max_len or None)
    if args.augment < 0:
        raise TinyshieldError(f"--augment must be >= 0 (0 turns it off), got {args.augment}")
    if max_len is not None and max_len < 0:
        raise TinyshieldError(f"--max-len must be >= 0 (0 keeps every position row), got {max_len}")
    if args.sweep:
        return run_sweep(args, loaded, budgets, unit, total, max_len)
    budget = budgets[0]
    name = args.model.rstrip("/").split("/")[-1]
    tag = (text if total else "emb" + text).replace(".", "_")
    out = args.out or build_dir() / "compressed" / f"{name}-{tag}"
    steps = 800 if args.finetune_steps is None else args.finetune_steps
    report, _ = compress_model(loaded.model, name, budget, unit, total=total, finetune_steps=steps,
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

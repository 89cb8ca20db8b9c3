"""`tinyshield moe train|run|trace|bench`: the MoE language model with experts on storage under a RAM budget."""


def register(sub):
    p = sub.add_parser("moe", help="MoE LM with experts offloaded to storage: train, run, trace, bench",
                       description="A byte-level Mixture-of-Experts LM whose experts live on storage; "
                                   "a byte-budgeted cache (LRU, LFU, AdapMoE, ...) decides what stays in RAM.")
    jobs = p.add_subparsers(dest="moe_job", metavar="ACTION")
    jobs.required = True

    t = jobs.add_parser("train", help="train the MoE LM on the shared text corpora (cached by config)")
    t.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    t.add_argument("--tiny", action="store_true", help="a tiny config that trains in seconds (smoke runs)")
    t.add_argument("--force", action="store_true", help="retrain even when a cached model exists")
    t.add_argument("--threads", type=int, help="torch threads (default: 1 on a machine of <= 2 usable cores, else 2)")
    t.set_defaults(func=run_train)

    def common(q):
        q.add_argument("--model", help="trained MoE model directory (default: the `moe train` model)")
        q.add_argument("--budget", default="25%", help="RAM for experts: bytes, 4MB, 512KiB or 25%% (default 25%%); "
                                                       "binary units: 1KB = 1KiB = 1,024 B, 1MB = 1MiB = 1,048,576 B")
        q.add_argument("--int8", action="store_true", help="store and cache experts as int8")
        q.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
        q.add_argument("--storage", default="host", help="storage profile the experts are read from: host (this "
                                                          "disk, unthrottled), ufs, emmc, sd, qspi")

    r = jobs.add_parser("run", help="generate text with experts served from the cache")
    common(r)
    r.add_argument("--policy", default="adapmoe", help="ram, resident (every expert in RAM: int8, the least-used "
                                                       "int4 to fit the budget), on-demand, lru, lfu, least-stale, "
                                                       "adapmoe (default); belady is offline-only (see trace)")
    r.add_argument("--margin", default="0", help="cache-aware routing: bonus on resident experts' gate logits, "
                                                 "or 'auto' (calibrated on training text for <= 1%% perplexity); "
                                                 "not with adapmoe")
    r.add_argument("--lowp", choices=("int8", "int4"), help="cheap misses: read this copy of a less important expert")
    r.add_argument("--lowp-max-weight", type=float, default=0.35, help="gate weight below which an expert counts "
                                                                       "as less important; 1 = every expert (an int8 "
                                                                       "cache holding 4x the experts)")
    r.add_argument("--prefetch", type=int, default=0, metavar="K",
                   help="lru/least-stale: prefetch the next layer's K predicted experts (default 0: off)")
    r.add_argument("--prompt", required=True, help="text to continue")
    r.add_argument("--tokens", type=int, default=200, help="bytes to generate (default 200)")
    r.add_argument("--temperature", type=float, default=0.8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-gating", action="store_true", help="adapmoe: keep both experts always")
    r.add_argument("--no-prefetch", action="store_true", help="adapmoe: no background prefetching")
    r.set_defaults(func=run_run)

    tr = jobs.add_parser("trace", help="record the expert routing trace of a text and replay it offline")
    common(tr)
    tr.add_argument("--corpus", default="wikitext2-test",
                    help="text to route: a corpus name (validation tail for training corpora) or a file path")
    tr.add_argument("--tokens", type=int, default=1024, help="bytes of it to run (default 1024)")
    tr.add_argument("--gating", action="store_true", help="record with adaptive gating on")
    tr.add_argument("--out", help="write the trace JSON here (default build/moe-trace.json)")
    tr.set_defaults(func=run_trace)

    b = jobs.add_parser("bench", help="the caching benchmark (same as python -m tools.bench.moe)")
    b.add_argument("--tokens", type=int, default=None, help="evaluation bytes (default: the benchmark's)")
    b.add_argument("--quick", action="store_true", help="a short run for a smoke check")
    b.add_argument("--repeats", type=int, default=1, help="runs per cell, fastest kept (tokens/s is noisy)")
    b.add_argument("--int8", action="store_true", help="benchmark the int8 expert store")
    b.add_argument("--model", help="trained MoE model directory (default: the `moe train` model)")
    b.add_argument("--budgets", help="percent of all expert bytes, comma separated (default 10,25,50)")
    b.add_argument("--storage", help="storage profiles, comma separated (default host,ufs,emmc,sd,qspi)")
    b.set_defaults(func=run_bench)


def _threads(n):
    import torch
    torch.set_num_threads(max(1, n))


def _store(args):
    from pathlib import Path

    from edge.moe.store import store_for
    from edge.moe.train import train

    if args.model:
        model_dir = Path(args.model)
        if not model_dir.is_dir():
            from base.errors import TinyshieldError
            raise TinyshieldError(f"{model_dir}: no such model directory — train one with `tinyshield moe train`")
    else:
        r = train()
        model_dir = r.path
    return store_for(model_dir, int8=args.int8, storage=args.storage)


def run_train(args):
    from edge.moe.train import MoERecipe, tiny_recipe, train

    over = {"steps": args.steps} if args.steps else {}
    if args.threads:
        over["threads"] = args.threads
    recipe = tiny_recipe(**over) if args.tiny else MoERecipe(**over)
    r = train(recipe, force=args.force)
    print(f"{r.name}: {'cached ' if r.cached else ''}model at {r.path}")
    for k, v in r.metrics.items():
        print(f"  {k}: {v}")


def _report(rt, budget):
    s = rt.stats.summary()
    print(f"policy {rt.policy_name}  storage {rt.store.storage}  budget {budget:,} B of {rt.store.total_bytes:,} B "
          f"of experts ({100 * budget / rt.store.total_bytes:.0f}%)"
          + (f"  cache-aware margin {rt.route_margin:g}" if rt.route_margin else "")
          + (f"  {rt.lowp} cache (every expert from its {rt.lowp} copy)" if rt.lowp_only
             else f"  cheap misses {rt.lowp} (gate weight < {rt.lowp_max_weight:g})" if rt.lowp else ""))
    print(f"  tokens/s {s['tokens_per_s']:.1f}   hit rate {100 * s['hit_rate']:.1f}%   "
          f"bytes read/token {s['bytes_per_token']:,.0f}   stall/token {s['stall_ms_per_token']:.2f} ms   "
          f"experts/token {s['experts_per_token']:.2f}")
    if rt.route_margin or rt.lowp:
        print(f"  rerouted layer passes {s['reroutes']}   low-precision reads {s['lowp_reads']}   "
              f"upgrades {s['upgrades']}")
    if s["prefetch_issued"]:
        print(f"  prefetch: issued {s['prefetch_issued']}  precision {100 * s['prefetch_precision']:.1f}%  "
              f"recall {100 * s['prefetch_recall']:.1f}%")


def run_run(args):
    from edge.moe.adapmoe import open_runtime, parse_budget
    from edge.moe.model import decode, encode

    _threads(args.threads)
    store = _store(args)
    budget = parse_budget(args.budget, store.total_bytes)
    if args.policy not in ("adapmoe", "resident"):
        from edge.moe.runtime import MoERuntime

        rt = MoERuntime(store, args.policy, budget, route_margin=_margin(args, store, budget), lowp=args.lowp,
                        lowp_max_weight=args.lowp_max_weight, prefetch=args.prefetch > 0,
                        prefetch_k=max(1, args.prefetch))
    elif args.margin != "0" or args.lowp or args.prefetch:
        from base.errors import TinyshieldError
        raise TinyshieldError(f"--margin, --lowp and --prefetch are not part of {args.policy}: use them with "
                              "--policy lru or least-stale")
    elif args.policy == "resident":
        rt = open_runtime(store, "resident", budget)
        print(f"resident: {rt.placement.describe()}; loaded in {1e3 * rt.stats.load_seconds:.0f} ms")
    else:
        rt = open_runtime(store, args.policy, budget, gating=not args.no_gating, prefetch=not args.no_prefetch)
    with rt:
        out = rt.generate(encode(args.prompt), args.tokens, temperature=args.temperature, seed=args.seed)
    print(decode(out))
    print()
    _report(rt, budget)


def _margin(args, store, budget) -> float:
    from base.errors import TinyshieldError

    if args.margin == "auto":
        from edge.moe.adapmoe import calibration_ids
        from edge.moe.calibrate import calibrate_margin

        cal = calibrate_margin(store, calibration_ids(), args.policy, budget, lowp=args.lowp,
                               lowp_max_weight=args.lowp_max_weight)
        print(f"cache-aware margin {cal.margin:g} (calibration perplexity within "
              f"{100 * cal.max_ppl_increase:.0f}% of top-2)")
        return cal.margin
    try:
        m = float(args.margin)
    except ValueError:
        raise TinyshieldError(f"--margin {args.margin!r}: give a number (gate-logit units) or 'auto'") from None
    if m < 0:
        raise TinyshieldError(f"--margin {m}: must be >= 0")
    return m


def run_trace(args):
    import json
    from pathlib import Path

    import torch

    from base import data
    from base.errors import TinyshieldError
    from edge.moe.adapmoe import open_runtime, parse_budget
    from edge.moe.model import encode
    from edge.moe.replay import replay_all
    from edge.moe.train import CORPORA, split_corpora
    from base.paths import build_dir

    _threads(args.threads)
    store = _store(args)
    if args.corpus in CORPORA:  # a training corpus: only its held-out tail
        ids = torch.from_numpy(split_corpora([args.corpus])[1][args.corpus].astype("int64"))
    elif args.corpus in data.TEXT_CORPORA:
        ids = encode(data.text_corpus(args.corpus))
    elif Path(args.corpus).is_file():
        ids = encode(Path(args.corpus).read_text(encoding="utf-8"))
    else:
        raise TinyshieldError(f"{args.corpus!r} is neither a corpus ({', '.join(data.TEXT_CORPORA)}) nor a file")
    ids = ids[:args.tokens + 1]
    with open_runtime(store, "adapmoe" if args.gating else "ram", store.total_bytes,
                      gating=args.gating, prefetch=False, dp=False) as rt:
        stats = rt.score(ids)
    trace = [list(k) for k in stats.trace]
    budget = parse_budget(args.budget, store.total_bytes)
    slots = budget // store.expert_bytes
    out = Path(args.out) if args.out else build_dir() / "moe-trace.json"
    out.write_text(json.dumps({"store": str(store.root), "corpus": args.corpus, "tokens": stats.tokens,
                               "gating": args.gating, "perplexity": stats.perplexity, "trace": trace}))
    cfg = store.cfg
    print(f"{stats.tokens} tokens, {len(trace)} expert accesses, perplexity {stats.perplexity:.3f}; trace -> {out}")
    for l in range(cfg.layers):
        counts = [sum(1 for k in stats.trace if k == (l, e)) for e in range(cfg.experts)]
        print(f"  layer {l}: uses per expert {counts}")
    print(f"offline replay at {slots} slots ({budget:,} B):")
    for name, hr in replay_all(stats.trace, cfg.layers, cfg.experts, slots).items():
        print(f"  {name:10s} hit rate {100 * hr:.1f}%")


def run_bench(args):
    from tools.bench.moe import main

    argv = []
    if args.tokens:
        argv += ["--tokens", str(args.tokens)]
    if args.quick:
        argv += ["--quick"]
    if args.model:
        argv += ["--model", args.model]
    if args.int8:
        argv += ["--int8"]
    if args.budgets:
        argv += ["--budgets", args.budgets]
    if args.storage:
        argv += ["--storage", args.storage]
    argv += ["--repeats", str(args.repeats)]
    return main(argv)

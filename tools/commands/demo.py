"""`tinyshield demo`: the main job end to end on the default (emulated) board."""


def register(sub):
    p = sub.add_parser("demo", help="run the main job end to end on the emulated board",
                       description="Train or load the tiny ViT, quantise it to int8, plan its memory, generate C, "
                                   "build and flash the firmware on the emulated default board, and evaluate MNIST "
                                   "test images on the device.")
    p.add_argument("--board", default="stm32f405", help="board (default stm32f405)")
    p.add_argument("--limit", type=int, default=1000, help="MNIST test images evaluated on the device (default 1000)")
    p.add_argument("--sst2-limit", type=int, default=872, help="SST-2 dev sentences for BERT-tiny (default all 872)")
    p.add_argument("--skip-bert", action="store_true", help="only the ViT part")
    p.add_argument("--bert", default=None, metavar="DIR",
                   help="a CLR-compressed BERT-tiny (from `tinyshield compress`); default: the bert-tiny-sst2 "
                        "recipe compressed to 1 MB of flash")
    p.set_defaults(func=run)


def run(args):
    from edge.data import data_dir
    from edge.progress import progress
    from edge.recipes.vit_mnist import train
    from mcu.build import build_model
    from mcu.device import evaluate, open_board
    from tools.commands.eval import print_report, test_set

    fallback = data_dir(required=False) is None
    r = train(fallback_data=fallback)
    print(f"data: {r.metrics['data']}")
    print(f"vit-mnist: test accuracy {r.metrics['test_accuracy']:.4f} on {r.metrics['test_images']} images "
          f"({'cached' if r.cached else 'trained'}; {r.path})")

    built = build_model(str(r.path), args.board, name="vit-mnist")
    print(f"int8 graph: {len(built.graph.ops)} ops, {built.macs:,} MACs, weights {built.graph.const_bytes():,} B; "
          f"{built.schedule.name} schedule, arena {built.plan.arena_bytes:,} B ({built.plan.strategy})")
    print(f"firmware {built.firmware.summary()}")
    xs, ys, _ = test_set("mnist", built, args.limit)
    with open_board(built.firmware) as dev, progress() as bar:
        print(f"flashed: {dev.info.board} (QEMU {dev.emulator.board.machine}) on {dev.emulator.url}, "
              f"model {dev.info.name}")
        ev = evaluate(dev, built, xs, ys, bar)
    print_report(ev, title=f"vit-mnist on {ev.board}")
    if not args.skip_bert:
        _bert(args)
    return 0


def _compressed_bert():
    """The bert-tiny-sst2 recipe compressed as `tinyshield compress bert-tiny-sst2 --flash 1MB` does, cached under
    a key of the trained model, the budget and the compression code (a change to any of them compresses again)."""
    from edge.compress.model import parse_size
    from edge.compress.pipeline import compress_model, recipe_max_len
    from edge.models.registry import load_dir
    from edge.paths import PROJECT_ROOT, build_dir, config_hash, files_hash
    from edge.recipes import recipes

    r = recipes()["bert-tiny-sst2"]()
    src = load_dir(r.path)
    budget = parse_size("1MB", "bytes") - (32 << 10)   # weights within 1 MB less 32 KB for the firmware's code (~25 KB)
    max_len = recipe_max_len(src.config)               # 64 position rows, as `tinyshield compress` cuts them
    key = config_hash({"model": str(r.path), "budget": budget, "max_len": max_len,
                       "code": files_hash((PROJECT_ROOT / "edge" / "compress").glob("*.py"))})
    out = build_dir() / "compressed" / f"bert-tiny-sst2-1MB-{key}"
    if not (out / "config.json").is_file():
        print(f"bert-tiny-sst2: {r.metrics.get('dev_accuracy', r.metrics)} ({r.path}); compressing to 1 MB of flash")
        compress_model(src.model, "bert-tiny-sst2", budget, "bytes", out=out, max_len=max_len)
    return out


def _bert(args):
    """BERT-tiny on SST-2 dev (L = 64) with its word table clustered low-rank to fit 1 MB of flash."""
    from edge.data import data_dir
    from edge.progress import progress
    from edge.recipes import recipes
    from mcu.build import build_model
    from mcu.device import evaluate, open_board
    from tools.commands.eval import print_report, test_set

    if "bert-tiny-sst2" not in recipes() or data_dir(required=False) is None:
        print("bert-tiny-sst2: needs its recipe and the SST-2 data (../shared/data); skipped")
        return
    if args.bert:
        from pathlib import Path
        out = Path(args.bert)
    else:
        out = _compressed_bert()
    built = build_model(str(out), args.board, seq_len=64, name="bert-tiny-sst2-clr")
    print(f"bert-tiny-sst2 (CLR): {built.macs:,} MACs, weights {built.graph.const_bytes():,} B, "
          f"arena {built.plan.arena_bytes:,} B; firmware {built.firmware.summary()}")
    xs, ys, _ = test_set("sst2", built, args.sst2_limit)
    with open_board(built.firmware) as dev, progress() as bar:
        ev = evaluate(dev, built, xs, ys, bar)
    print_report(ev, title=f"bert-tiny-sst2 (CLR embedding, L = 64) on {ev.board}")

"""`tinyshield demo`: the main job end to end on the default (emulated) board."""


def register(sub):
    p = sub.add_parser("demo", help="run the main job end to end on the emulated board",
                       description="Train or load the tiny ViT, quantise it to int8, plan its memory, generate C, "
                                   "build and flash the firmware on the emulated default board, and evaluate MNIST "
                                   "test images on the device.")
    p.add_argument("--board", default="stm32f405", help="board (default stm32f405)")
    p.add_argument("--limit", type=int, default=1000, help="MNIST test images evaluated on the device (default 1000)")
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
    _bert(args)
    return 0


def _bert(args):
    """The compressed BERT-tiny on SST-2, when its recipe exists."""
    from edge.recipes import recipes
    if "bert-tiny-sst2" not in recipes():
        print("bert-tiny-sst2: recipe not available yet; skipped")
        return
    print("bert-tiny-sst2: see `tinyshield eval bert-tiny-sst2 --board stm32f405 --dataset sst2`")

"""`tinyshield eval MODEL --board B --dataset mnist --limit 1000`: accuracy and cost on the device."""


def register(sub):
    from tools.run_board import add_board_args
    p = sub.add_parser("eval", help="evaluate a model on a board over the serial link",
                       description="Run a test set on the (emulated) board: accuracy, instructions per inference "
                                   "and per MAC, peak SRAM measured on the device, agreement with the host int8 reference.")
    p.add_argument("model", nargs="?", default="vit-mnist",
                   help="recipe name, model directory, .pt2 or int8 .tflite file (default vit-mnist)")
    add_board_args(p)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "sst2"], help="test set (default mnist)")
    p.add_argument("--data", default=None, metavar="FILE.npz",
                   help="test set as .npz with `x` (batch-first inputs) and `y` (labels), instead of --dataset")
    p.add_argument("--limit", type=int, default=1000, help="number of test inputs (default 1000)")
    p.add_argument("--url", default=None, help="serial URL of a running board instead of booting the emulator")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    f = p.add_argument_group("fleet (the optional 'fleet' extra, Ray)")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--boards", type=int, default=None, metavar="N",
                   help="split the data set over N emulated boards, each a Ray actor")
    g.add_argument("--fleet", default=None, metavar="TOML",
                   help="split it over the boards named in a board file ([[board]] name, board, url, probe)")
    f.add_argument("--address", default=None,
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local one")
    f.add_argument("--chunk", type=int, default=None, help="inputs per task sent to a board (default: ~4 per board)")
    p.set_defaults(func=run)


def run(args):
    import json
    from dataclasses import asdict

    from base.progress import progress
    from mcu.device import evaluate
    from tools.report import print_report
    from tools.run_board import build, device_for

    import numpy as np

    from base.errors import TinyshieldError
    from mcu.build import float_outputs

    fleet = args.boards is not None or args.fleet is not None or args.address is not None
    if fleet and args.url:
        raise TinyshieldError("--url names one board; a fleet is --boards N or --fleet boards.toml (not both)")
    if fleet:
        from base.cluster import require_ray
        from mcu.fleet import HINT
        require_ray(HINT)               # before the (slow) build, not after it
    built = build(args)
    xs, ys, source = built.test_set(args.dataset, args.limit, args.data)
    print(f"data: {source}; firmware {built.firmware.elf}")
    if built.kind == "tflite":
        if fleet:
            raise TinyshieldError("a .tflite model is evaluated on one board (no --boards/--fleet yet)")
        return run_tflite(args, built, xs, ys)
    fe = None
    if fleet:
        from mcu.fleet import Fleet
        make = (lambda: Fleet.from_file(built, args.fleet, args.address)) if args.fleet else \
            (lambda: Fleet.emulated(built, args.boards or 1, args.address))
        with make() as fl, progress() as bar:
            fe = fl.evaluate(xs, ys, bar, chunk_size=args.chunk)
        ev = fe.evaluation
    else:
        with device_for(built, args.url) as dev, progress() as bar:
            ev = evaluate(dev, built, xs, ys, bar)
    fp = float_outputs(args.model, built.graph, xs).argmax(-1)
    dev_pred = np.array(ev.predictions)
    extra = {"float_accuracy": float(np.mean(fp == np.asarray(ys))),
             "int8_float_agreement": float(np.mean(fp == dev_pred))}
    print_report(ev, extra=[("float model accuracy", f"{100 * extra['float_accuracy']:.2f}%"),
                            ("device vs float (argmax)", f"{100 * extra['int8_float_agreement']:.2f}%")])
    out = {**asdict(ev), **extra}
    if fe is not None:
        print_report(fe, title="fleet")
        for fail in fe.failures:
            print(f"board {fail.board} failed (chunk {fail.chunk}): {fail.error} -> {fail.action}")
        out = {**asdict(fe), **extra}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def run_tflite(args, built, xs, ys):
    """A .tflite model: the board, the host reference and TFLite Micro (its interpreter on this machine)
    on the same inputs; the board's outputs must equal TFLite Micro's bit for bit. A model with an
    operator TFLite Micro lacks (GELU) is compared with LiteRT's interpreter instead, and says so."""
    import json
    import time
    from dataclasses import asdict

    from base.progress import progress
    from mcu.device import run_inputs, summarise
    from mcu.from_tflite import agreement, largest_difference, litert_outputs, micro_outputs
    from tools.report import print_report
    from tools.run_board import device_for

    t0 = time.monotonic()
    with device_for(built, args.url) as dev, progress() as bar:
        task = bar.add_task(f"eval on {dev.info.board}", total=len(xs), info="")
        records = []
        for rec in run_inputs(dev, built, xs):
            records.append(rec)
            bar.update(task, advance=1)
        ev = summarise(dev.info, records, ys, time.monotonic() - t0)
    outs = [r.output for r in records]
    lacking = built.graph.meta.get("not_in_micro")
    if lacking:
        print(f"TFLite Micro has no {lacking} kernel: comparing with LiteRT's interpreter instead")
        lite = litert_outputs(args.model, xs)
        bad = agreement(built.graph, outs, lite)
        # the board keeps TFLite Micro's arithmetic for every other operator; LiteRT's own int8 kernels
        # (FULLY_CONNECTED, ...) round some ties the other way, so 1 step apart is TFLite Micro vs LiteRT
        diff = largest_difference(built.graph, outs, lite)
        extra = {"litert_agreement": 1 - len(bad) / max(len(xs), 1), "litert_mismatches": bad,
                 "litert_largest_difference": diff}
        print_report(ev, extra=[("device vs LiteRT", f"{100 * extra['litert_agreement']:.2f}% "
                                                     f"({len(xs) - len(bad)}/{len(xs)} bit-identical, "
                                                     f"largest difference {diff} step(s))")])
        ok = diff <= 1
    else:
        micro, arena = micro_outputs(args.model, xs)
        bad = agreement(built.graph, outs, micro)
        ok = not bad
        extra = {"tflm_agreement": 1 - len(bad) / max(len(xs), 1), "tflm_mismatches": bad,
                 "tflm_arena_bytes": arena}
        print_report(ev, extra=[("device vs TFLite Micro", f"{100 * extra['tflm_agreement']:.2f}% "
                                                          f"({len(xs) - len(bad)}/{len(xs)} bit-identical)"),
                                ("TFLite Micro arena", f"{arena:,} B (ours {ev.arena_bytes:,} B: "
                                                       f"{arena / max(ev.arena_bytes, 1):.2f}x smaller)")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(ev), **extra}, f, indent=1)
    return 0 if ok else 1

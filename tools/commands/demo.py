"""`tinyshield demo`: the main job end to end on the default (emulated) board, both models."""


def register(sub):
    p = sub.add_parser("demo", help="run the main job end to end on the emulated board",
                       description="Load the tiny ViT (shipped weights, else trained), quantise it to int8, plan its "
                                   "memory, generate C, build and flash the firmware on the emulated default board "
                                   "and evaluate MNIST test images on the device; then the same for BERT-tiny "
                                   "compressed to 1 MB of flash: on SST-2 dev with the data folder, else on the "
                                   "short labelled sentences tinyshield ships.")
    p.add_argument("--board", default="stm32f405", help="board (default stm32f405)")
    p.add_argument("--limit", type=int, default=1000, help="MNIST test images evaluated on the device (default 1000)")
    p.add_argument("--sst2-limit", type=int, default=872, help="SST-2 dev sentences for BERT-tiny (default all 872)")
    p.add_argument("--skip-bert", action="store_true", help="only the ViT part")
    p.add_argument("--bert", default=None, metavar="DIR",
                   help="a CLR-compressed BERT-tiny (from `tinyshield compress`); default: the bert-tiny-sst2 "
                        "recipe compressed to 1 MB of flash (shipped)")
    p.add_argument("--boards", type=int, default=None,
                   help="emulated boards evaluating at once, one QEMU each (default: the free cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for host work (default: the free cores this process may use)")
    p.set_defaults(func=run)


def run(args):
    import time

    import torch

    from base.data import data_dir
    from edge.recipes import pick_threads

    torch.set_num_threads(pick_threads(args.threads))
    shared = data_dir(required=False) is not None
    times: dict[str, float] = {}
    t0 = time.monotonic()
    _vit(args, shared, times)
    if not args.skip_bert:
        _bert(args, shared, times)
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; total {time.monotonic() - t0:.0f} s ({torch.get_num_threads()} torch thread(s))")
    return 0


def _origin(r) -> str:
    return "shipped weights" if r.shipped else "cached" if r.cached else "trained"


def _vit(args, shared: bool, times: dict):
    import time

    from base.progress import progress
    from edge.recipes.vit_mnist import train
    from mcu.build import build_model
    from mcu.multiboard import evaluate_on_boards
    from tools.report import print_report

    t = time.monotonic()
    r = train(fallback_data=not shared, threads=args.threads, any_shipped=True)
    print(f"vit-mnist ({_origin(r)}; {r.path}): trained on {r.metrics['data']}; "
          f"test accuracy {r.metrics['test_accuracy']:.4f} on {r.metrics['test_images']} images")
    if r.note:
        print(f"  note: {r.note}")
    times["vit model"] = time.monotonic() - t

    t = time.monotonic()
    built = build_model(str(r.path), args.board, name="vit-mnist")
    print(f"int8 graph: {len(built.graph.ops)} ops, {built.macs:,} MACs, weights {built.graph.const_bytes():,} B; "
          f"{built.schedule.name} schedule, arena {built.plan.arena_bytes:,} B ({built.plan.strategy})")
    print(f"firmware {built.firmware.summary()}")
    times["vit quantise+plan+build"] = time.monotonic() - t

    t = time.monotonic()
    xs, ys, source = built.test_set("mnist", args.limit)
    n = _boards(args)
    print(f"on-board test: {len(xs)} images of {source}; {_boards_line(args, built, n)}")
    with progress() as bar:
        ev = evaluate_on_boards(built, xs, ys, n, bar)
    print_report(ev, title=f"vit-mnist on {ev.board}")
    _counts_line(ev)
    times[f"vit eval ({len(xs)} images)"] = time.monotonic() - t


def _boards(args) -> int:
    """Boards at once: as asked, else one QEMU per core free right now (decided just before each
    evaluation, when the build work before it is over)."""
    from edge.recipes import pick_threads
    return pick_threads(args.boards)


def _boards_line(args, built, n: int) -> str:
    from mcu.boards import board
    return (f"flashed on {n} emulated {built.board} board{'s' if n > 1 else ''} (QEMU {board(built.board).machine}"
            f"{', one per free core' if args.boards is None else ''})")


def _counts_line(ev):
    """Instruction counts depend on the input (saturation and lookup branches in the kernels), so every
    input is counted on the board; say how much they vary."""
    if ev.instructions:
        lo, hi = min(ev.instructions), max(ev.instructions)
        print(f"instructions counted on every input ({len(ev.instructions):,}): {lo:,} to {hi:,} per inference"
              + (" (the same for every input)" if lo == hi else ", they vary with the input"))


def _calibration_file(L: int):
    """The shipped calibration sentences as padded token ids (an .npz with `x`), for int8 calibration without
    SST-2; written once under build/."""
    import numpy as np

    from base.data import sentences
    from base.paths import artefact_dir
    from edge.models.minilm import token_ids

    s = sentences("calib")
    path = artefact_dir("demo/calib", {"texts": s.texts, "L": L}) / "sentences.npz"
    if not path.is_file():
        np.savez(path, x=token_ids(s.texts, L))
    return path


def _bert(args, shared: bool, times: dict):
    """BERT-tiny (L = 64) with its word table clustered low-rank to fit 1 MB of flash, on the board."""
    import time
    from pathlib import Path

    import numpy as np

    from base.errors import TinyshieldError
    from base.progress import progress
    from edge.recipes.bert_tiny_sst2 import compressed_1mb
    from mcu.build import build_model, float_outputs
    from mcu.multiboard import evaluate_on_boards
    from tools.report import print_report

    t = time.monotonic()
    if args.bert:
        out, origin = Path(args.bert), "given"
    else:
        try:
            r = compressed_1mb(threads=args.threads, any_shipped=True)
        except TinyshieldError as e:
            print(f"bert-tiny-sst2: skipped: {e}")
            return
        out, origin = r.path, _origin(r)
        acc = r.metrics.get("dev_accuracy")
        print(f"bert-tiny-sst2 (CLR, 1 MB): SST-2 dev accuracy {acc:.4f} on the host ({origin}; {out})"
              if acc is not None else f"bert-tiny-sst2 (CLR, 1 MB): {origin}; {out}")
        if r.note:
            print(f"  note: {r.note}")
    times["bert model"] = time.monotonic() - t

    t = time.monotonic()
    L = 64
    calib = None if shared else _calibration_file(L)
    built = build_model(str(out), args.board, seq_len=L, name="bert-tiny-sst2-clr", calib_file=calib)
    print(f"bert-tiny-sst2 (CLR): {built.macs:,} MACs, weights {built.graph.const_bytes():,} B, "
          f"arena {built.plan.arena_bytes:,} B; int8 calibrated on "
          f"{'500 SST-2 training sentences' if shared else 'the 32 shipped calibration sentences'}; "
          f"firmware {built.firmware.summary()}")
    times["bert quantise+plan+build"] = time.monotonic() - t

    t = time.monotonic()
    if shared:
        xs, ys, _ = built.test_set("sst2", args.sst2_limit)
        texts = None
    else:
        from base.data import sentences
        from edge.models.minilm import token_ids
        s = sentences("test")
        texts, ys = s.texts, s.labels
        xs = token_ids(texts, L)
    n = _boards(args)
    print(f"on-board test: {len(xs)} sentences; {_boards_line(args, built, n)}")
    with progress() as bar:
        ev = evaluate_on_boards(built, xs, ys, n, bar)
    if texts is not None:
        fp = float_outputs(str(out), built.graph, xs).argmax(-1)
        names = ["neg", "pos"]
        print(f"{'label':5} {'board':5} {'float':5}  sentence (shipped, written for tinyshield)")
        for text, y, p, f in zip(texts, ys, ev.predictions, fp):
            print(f"{names[y]:5} {names[p]:5} {names[f]:5}{'' if p == y else '  x'} {text}")
        print(f"board accuracy {ev.accuracy:.3f} on {len(xs)} sentences, float model {np.mean(fp == ys):.3f}; "
              f"board = host int8 reference on {ev.agreement:.1%}")
    title = ("bert-tiny-sst2 (CLR embedding, L = 64) on " + ev.board
             + ("" if shared else ", shipped sentences"))
    print_report(ev, title=title)
    _counts_line(ev)
    if not shared:
        print("the full SST-2 dev evaluation (872 sentences) needs the data folder: put it at ../shared/data "
              "or set $TINYSHIELD_DATA")
    times[f"bert eval ({len(xs)} sentences)"] = time.monotonic() - t

"""`tinyshield plan`: memory profile of a model's schedule on a board (peak, live set, arena map)."""


def register(sub):
    p = sub.add_parser("plan", help="profile the memory schedule of a model against a board's RAM",
                       description="Lower MODEL to int8, schedule it (tiled or layerwise), plan the arena and "
                                   "print the peak, the live set op by op and the arena map. Refuses a plan "
                                   "over the board's RAM budget.")
    p.add_argument("model", help="bert-tiny, vit-mnist, minilm, a model directory, a .pt2 or an int8 .tflite file")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration inputs (.npy/.npz, batch-first) for a .pt2 model (default: its example input; "
                        "scales change no buffer size)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens for text models (default 128)")
    p.add_argument("--board", default="stm32f405", help="board whose RAM budget applies (default stm32f405)")
    p.add_argument("--schedule", choices=["tiled", "layerwise"], default="tiled")
    p.add_argument("--kv", choices=["auto", "keep", "recompute"], default="auto",
                   help="attention's K and V: keep them (3 L d), recompute them from the layer input per query block "
                        "(2 L d, more MACs), or auto: recompute only in the layers where keeping does not fit (default)")
    p.add_argument("--tiles", default=None, metavar="ROWS,KT",
                   help="fixed tile sizes (tokens per block, keys per tile) instead of the search (K/V kept unless "
                        "--kv recompute)")
    p.add_argument("--strategy", choices=["best_fit", "greedy_by_size"], default="best_fit",
                   help="arena planner (greedy_by_size is TFLite Micro's)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw the memory timeline of both schedules")
    p.add_argument("--rows", type=int, default=40, help="at most this many ops in the live-set table")
    sw = p.add_argument_group("sweep (the optional 'fleet' extra, Ray Tune)")
    sw.add_argument("--sweep", action="store_true",
                    help="run every tile size x arena planner (and layerwise) as a Ray Tune trial: table, JSON, Pareto plot")
    sw.add_argument("--sweep-rows", default=None, metavar="R,R,...", help="tokens per block to try (default 1, 2, 4, ... L)")
    sw.add_argument("--sweep-kt", default=None, metavar="K,K,...", help="keys per tile to try (default 16, 64, 256 below L, and L)")
    sw.add_argument("--out", default=None, help="sweep output directory (default build/sweeps/plan-MODEL-LSEQ-BOARD)")
    sw.add_argument("--address", default=None, help="run the trials on this Ray cluster instead of a local one")
    p.set_defaults(func=run)


def _ints(text, flag):
    from base.errors import TinyshieldError
    try:
        return [int(v) for v in text.split(",")] if text else None
    except ValueError:
        raise TinyshieldError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 8,16,32") from None


def run_sweep(args):
    from rich.console import Console

    from base.paths import build_dir
    from mcu.sweep import plan_sweep, rich_table

    console = Console(width=None if Console().is_terminal else 160)
    name = args.model.rstrip("/").split("/")[-1]
    out = args.out or build_dir() / "sweeps" / f"plan-{name}-L{args.seq_len}-{args.board}"
    with console.status(f"sweeping {name} (L = {args.seq_len}) as Ray Tune trials"):
        res = plan_sweep(args.model, args.seq_len, args.board, out, _ints(args.sweep_rows, "--sweep-rows"),
                         _ints(args.sweep_kt, "--sweep-kt"), args.address)
    console.print(rich_table(res))
    console.print(f"{len(res.trials)} trials in {res.seconds:.1f} s; wrote {res.files['table']}, "
                  f"{res.files['json']}, {res.files['plot']}")
    return 0


def _tiles(text):
    from base.errors import TinyshieldError
    try:
        rows, kt = (int(v) for v in text.split(","))
    except ValueError:
        raise TinyshieldError(f"--tiles {text!r}: give two integers ROWS,KT, e.g. --tiles 16,512") from None
    return rows, kt


def run(args):
    from rich.console import Console

    from base.errors import TinyshieldError
    from mcu.boards import arena_budget
    from mcu.profile import check_budget, planning_graph, plot_timelines, profile, render
    from dataclasses import asdict

    from mcu.profile import search_table
    from mcu.schedules import Tiles, attention_layers, layerwise, search_tiles, tiled_with

    if args.seq_len < 1:
        raise TinyshieldError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.sweep:
        return run_sweep(args)
    console = Console(width=None if Console().is_terminal else 160)
    arena_budget(args.board)          # an unknown board fails before the (slower) lowering
    fixed = _tiles(args.tiles) if args.tiles else None
    with console.status(f"lowering {args.model} to int8 (L = {args.seq_len})"):
        graph = planning_graph(args.model, args.seq_len, calib_file=args.calib)
    budget = arena_budget(args.board, graph)
    with console.status("scheduling and planning"):
        search = None
        tiles = None
        if graph.meta.get("source") == "tflite":        # an imported .tflite: row blocks, not attention tiles
            from mcu.tflite_schedule import search_rows
            scheds = {"layerwise": layerwise(graph), "tiled": search_rows(graph)}
        else:
            if fixed is None:
                search = search_tiles(graph, budget, kv=args.kv)
                tiles = Tiles(search.chosen.rows, search.chosen.kt, search.chosen.recompute)
            else:
                tiles = Tiles(*fixed, tuple(range(attention_layers(graph))) if args.kv == "recompute" else ())
            scheds = {"layerwise": layerwise(graph), "tiled": tiled_with(graph, tiles)}
        profs = {k: profile(s, args.strategy) for k, s in scheds.items()}
    prof = profs[args.schedule]
    render(prof, console, budget=budget, board=args.board, max_rows=args.rows)
    if tiles is not None and tiles.recompute:
        base = tiled_with(graph, Tiles(tiles.rows, tiles.kt)).macs()
        console.print(f"K/V recomputed in attention layer(s) {', '.join(map(str, tiles.recompute))}: "
                      f"{scheds['tiled'].macs():,} MACs, {100 * (scheds['tiled'].macs() / base - 1):.1f}% more than "
                      f"the same tiles keeping K/V ({base:,}), {100 * (scheds['tiled'].macs() / scheds['layerwise'].macs() - 1):.1f}% "
                      f"more than layerwise")
    if search is not None and args.schedule == "tiled":
        console.print(search_table([asdict(c) for c in search.candidates], scheds["layerwise"].macs(),
                                   (tiles.rows, tiles.kt, tiles.recompute),
                                   f"tile search ({'fewest MACs, then calls, within' if search.fits else 'nothing fits'} "
                                   f"the {budget:,} B budget)"))
    if graph.meta.get("source") == "tflite":
        from mcu.tflite_schedule import summary
        console.print(summary(scheds["tiled"]))
    other = profs["tiled" if args.schedule == "layerwise" else "layerwise"]
    console.print(f"{other.schedule}: arena {other.arena_bytes:,} B (peak at {other.peak_op}); "
                  f"{prof.schedule} / {other.schedule} = {prof.arena_bytes / other.arena_bytes:.3f}")
    if args.plot:
        plot_timelines(list(profs.values()), args.plot, budget,
                       f"{graph.name}, L = {args.seq_len}, {args.board}")
        console.print(f"timeline written to {args.plot}")
    check_budget(prof, budget, args.board)
    return 0

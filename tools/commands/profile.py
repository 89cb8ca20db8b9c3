"""`tinyshield profile MODEL --board B`: executed instructions, MACs, arena and stack per operator,
measured on the emulated board; a table, a PNG and JSON."""


def register(sub):
    from tools.run_board import add_board_args, add_input_args
    p = sub.add_parser("profile", help="per-operator instructions, MACs, arena and stack on the board",
                       description="Run MODEL on the emulated board with the instruction counter cutting every "
                                   "inference at each kernel call (the deployed firmware, unchanged): instructions, "
                                   "MACs and instructions per MAC per op, arena bytes live per op as planned, stack "
                                   "high-water per op (measured on the tap build).")
    p.add_argument("model", help="recipe name, model directory or .pt2 file")
    add_board_args(p)
    add_input_args(p, default=1)
    p.add_argument("--no-stack", action="store_true", help="skip the per-op stack measurement (no tap build)")
    p.add_argument("--png", default=None, help="write the chart here (default: <model>-<board>-profile.png)")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.set_defaults(func=run)


def run(args):
    import json
    import shutil
    from pathlib import Path

    from rich.console import Console

    from mcu.opprofile import plot, profile_ops, render
    from tools.run_board import build, inputs_for

    built = build(args)
    xs, source = inputs_for(args, built)
    print(f"inputs: {len(xs)} from {source}; firmware {built.firmware.elf}")
    p = profile_ops(built, xs, stack=not args.no_stack)
    render(p, Console(width=max(shutil.get_terminal_size().columns, 160)))
    png = args.png or f"{Path(built.name).stem}-{built.board}-profile.png"
    plot(p, png)
    print(f"PNG: {png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(p.to_json(), f, indent=1)
        print(f"JSON: {args.json}")
    return 0 if p.op_sum == p.total_instructions else 1

"""`tinyshield validate MODEL --board B [--inputs N]`: every op's output on the device against the host
int8 reference and the float model (a tap build of the model steps the board op by op)."""


def register(sub):
    from tools.run_board import add_board_args, add_input_args
    p = sub.add_parser("validate", help="compare every op's output on the board with the host int8 reference and float",
                       description="Build a tap firmware of MODEL (same schedule and arena plan), step it op by op on "
                                   "the emulated board, read each op's output back over the serial link and compare it "
                                   "with the host int8 reference (max |Δ| in LSB) and with the float model (cosine, SNR). "
                                   "Exit code 1 when the device diverges from the reference.")
    p.add_argument("model", help="recipe name, model directory or .pt2 file")
    add_board_args(p)
    add_input_args(p, default=4)
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.set_defaults(func=run)


def run(args):
    import json
    import shutil

    from rich.console import Console

    from base.progress import progress
    from mcu.build import firmware_variant
    from mcu.device import open_board
    from mcu.validate import render, validate
    from tools.run_board import build, inputs_for

    built = build(args)
    xs, source = inputs_for(args, built)
    fw = firmware_variant(built, taps=True)
    print(f"inputs: {len(xs)} from {source}; tap firmware {fw.elf} ({fw.taps} segments)")
    with open_board(fw) as dev, progress() as bar:
        v = validate(built, dev, xs, spec=args.model, progress_bar=bar)
    render(v, Console(width=max(shutil.get_terminal_size().columns, 160)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(v.to_json(), f, indent=1)
        print(f"JSON: {args.json}")
    return 0 if v.passed else 1

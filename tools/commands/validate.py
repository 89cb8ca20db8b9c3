"""`tinyshield validate MODEL --board B [--inputs N]`: every op's output on the device against the host
int8 reference and the float model (a tap build of the model steps the board op by op)."""


def register(sub):
    from tools.run_board import add_board_args
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


def add_input_args(p, default: int):
    p.add_argument("--inputs", type=int, default=default, metavar="N", help=f"number of test inputs (default {default})")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="inputs as .npy, or .npz with `x` (default: the recipe's test set; for a .pt2 the --calib file)")


def inputs_for(args, built):
    """The first --inputs inputs of --data, the recipe's test set, or (a .pt2) the calibration file."""
    from pathlib import Path

    from base.errors import TinyshieldError
    from base.data import load_array
    from tools.commands.eval import test_set

    if args.inputs < 1:
        raise TinyshieldError(f"--inputs {args.inputs}: give at least 1")
    if args.data:
        return load_array(args.data, "x")[:args.inputs], args.data
    if built.kind == "pt2":
        if not Path(str(args.calib)).is_file():
            raise TinyshieldError("a .pt2 model needs inputs: pass --data inputs.npy (or --calib FILE, whose inputs are used)")
        return load_array(args.calib, "x")[:args.inputs], f"{args.calib} (calibration inputs)"
    xs, _, source = test_set("mnist" if built.kind == "vit" else "sst2", built, args.inputs)
    return xs, source


def run(args):
    import json
    import shutil

    from rich.console import Console

    from base.progress import progress
    from mcu.build import firmware_variant
    from mcu.device import open_board
    from mcu.validate import render, validate
    from tools.run_board import build

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

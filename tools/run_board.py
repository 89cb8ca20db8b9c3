"""`tinyshield run --board ...`, `eval --board ...` and `flash`: the board side of the CLI.

A board is either the emulated one left running by `tinyshield flash` (found in build/boards/),
one given by --url (a real board over /dev/ttyACM0, or any socket://), or else a fresh emulator
booted for this command and stopped after it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from base.errors import TinyshieldError


def add_board_args(p, model_optional: bool = False):
    from mcu.boards import BOARDS, DEFAULT_BOARD
    p.add_argument("--board", default=None, choices=list(BOARDS), help=f"board (default {DEFAULT_BOARD})")
    p.add_argument("--schedule", default="layerwise", choices=["layerwise", "tiled", "recompute"],
                   help="memory schedule of the generated code (default layerwise; tiled recomputes attention's K/V "
                        "only where keeping them does not fit, recompute always does)")
    p.add_argument("--calib", default="500", metavar="N|FILE",
                   help="int8 calibration: the number of the recipe's training inputs (default 500), or a .npy/.npz "
                        "file of batch-first inputs (needed for a .pt2 model)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length of text models (default 64)")


def calib_args(value) -> tuple[int, str | None]:
    """--calib N or --calib FILE -> (count, file)."""
    value = str(value)
    if value.isdigit():
        return int(value), None
    if not Path(value).is_file():
        raise TinyshieldError(f"--calib {value}: give a number of inputs or an existing .npy/.npz file")
    return 1 << 30, value


def build(args):
    from mcu.build import build_model
    n, f = calib_args(getattr(args, "calib", 500))
    return build_model(args.model, args.board, schedule=getattr(args, "schedule", "layerwise"),
                       calib=n, calib_file=f, seq_len=getattr(args, "seq_len", None))


@contextmanager
def device_for(built, url: str | None = None):
    """A Device running `built`: --url, the board left running by `flash` (if it runs this
    firmware), or a fresh emulator for the duration of the command."""
    from mcu import flash
    from mcu.device import connect, open_board

    if url:
        dev = connect(url)
        try:
            yield dev
        finally:
            dev.close()
        return
    rb = flash.running(built.board)
    if rb is not None and Path(rb.elf) == built.firmware.elf:
        dev = connect(rb.url, count_file=Path(rb.count_file))
        try:
            yield dev
        finally:
            dev.close()
        return
    with open_board(built.firmware) as dev:
        yield dev


def load_input(spec: str, built):
    """INPUT for a board, raw as the model takes it (the board's graph quantises it): mnist:INDEX (a test image
    and its label), an .npy/.png image, or text; for a .pt2 or .tflite model an .npy file holding one input."""
    if built.kind in ("pt2", "tflite"):
        from base.data import load_array
        return load_array(spec, "x"), None
    if built.kind == "vit":
        from edge.inputs import load_image
        return load_image(spec)
    from edge.models.minilm import token_ids
    return token_ids([spec], built.graph.tensors[built.graph.inputs[0]].shape[0])[0], None


def run_on_board(args) -> int:
    import numpy as np
    if not args.inputs:
        raise TinyshieldError("give at least one INPUT (e.g. mnist:0)")
    built = build(args)
    with device_for(built, args.url) as dev:
        for spec in args.inputs:
            x, label = load_input(spec, built)
            q = built.quantise_input(x)
            r = dev.infer(q)
            ref = built.reference(q)
            logits = dev.dequantise(r.output).reshape(-1)
            same = np.array_equal(r.output.reshape(-1), ref.reshape(-1))
            print(f"{spec}: class {int(np.argmax(logits))}" + (f" (label {label})" if label is not None else "")
                  + f"  logits {np.array2string(logits, precision=2)}")
            n = f"{r.instructions:,} instructions" if r.instructions is not None else f"{r.cycles:,} cycles"
            print(f"  on {dev.info.board}: {n}, stack {r.stack_bytes:,} B, arena {r.arena_bytes:,} B, "
                  f"peak SRAM {r.peak_sram:,} B; host int8 reference {'identical' if same else 'DIFFERS'}")
    return 0


def add_input_args(p, default: int):
    p.add_argument("--inputs", type=int, default=default, metavar="N", help=f"number of test inputs (default {default})")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="inputs as .npy, or .npz with `x` (default: the recipe's test set; for a .pt2 the --calib file)")


def inputs_for(args, built):
    """The first --inputs inputs of --data, the recipe's test set, or (a .pt2) the calibration file."""
    from pathlib import Path

    from base.errors import TinyshieldError
    from base.data import load_array

    if args.inputs < 1:
        raise TinyshieldError(f"--inputs {args.inputs}: give at least 1")
    if args.data:
        return load_array(args.data, "x")[:args.inputs], args.data
    if built.kind == "pt2":
        if not Path(str(args.calib)).is_file():
            raise TinyshieldError("a .pt2 model needs inputs: pass --data inputs.npy (or --calib FILE, whose inputs are used)")
        return load_array(args.calib, "x")[:args.inputs], f"{args.calib} (calibration inputs)"
    xs, _, source = built.test_set("mnist" if built.kind == "vit" else "sst2", args.inputs)
    return xs, source

"""`tinyshield flash FIRMWARE --board B`: boot firmware on the emulated board (or a real one with --probe)."""


def register(sub):
    from mcu.boards import BOARDS
    p = sub.add_parser("flash", help="put firmware on a board and leave it running",
                       description="FIRMWARE is a built fw.elf or a model (built first). The emulated board "
                                   "keeps running for later `run`/`eval --board` commands until --stop.")
    p.add_argument("firmware", nargs="?", help="fw.elf from `tinyshield build`, or a model (recipe name / directory)")
    p.add_argument("--board", default=None, choices=list(BOARDS), help="board (default stm32f405)")
    p.add_argument("--probe", action="store_true", help="flash a real board through a debug probe (needs pyocd)")
    p.add_argument("--port", type=int, default=None, help="TCP port of the emulated UART (default: a free one)")
    p.add_argument("--stop", action="store_true", help="stop the emulated board instead")
    p.set_defaults(func=run)


def run(args):
    import json
    from pathlib import Path

    from base.errors import TinyshieldError
    from mcu import flash
    from mcu.boards import board as get_board
    from mcu.compile import Firmware

    b = get_board(args.board)
    if args.stop:
        print(f"{b.id}: {'stopped' if flash.stop(b.id) else 'was not running'}")
        return 0
    if not args.firmware:
        raise TinyshieldError("give FIRMWARE (a fw.elf or a model) or --stop")
    p = Path(args.firmware)
    if p.suffix == ".elf":
        meta = p.parent / "firmware.json"
        if not p.is_file() or not meta.is_file():
            raise TinyshieldError(f"{p} is not a firmware built by `tinyshield build` (no {meta.name} beside it)")
        fw = Firmware.from_json(json.loads(meta.read_text()))
        if args.board and fw.board != b.id:
            raise TinyshieldError(f"{p} was built for {fw.board}, not {b.id}: rebuild with --board {b.id}")
        b = get_board(fw.board)
    else:
        from mcu.build import build_model
        fw = build_model(args.firmware, b.id).firmware
    if args.probe:
        flash.flash_probe(fw.elf, fw.board)
        print(f"flashed {fw.elf} to the {fw.board} on the probe")
        return 0
    rb = flash.flash_emulated(fw, port=args.port)
    print(f"{rb.board} running {rb.model} (QEMU pid {rb.pid}) on {rb.url}")
    print(f"  tinyshield run --board {rb.board} MODEL mnist:0   |   tinyshield flash --board {rb.board} --stop")
    return 0

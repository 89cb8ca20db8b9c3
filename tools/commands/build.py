"""`tinyshield build MODEL --board B`: quantise, schedule, plan, generate C, compile the firmware."""


def register(sub):
    from tools.run_board import add_board_args
    p = sub.add_parser("build", help="build firmware for a board from a model",
                       description="int8-quantise MODEL, schedule and plan its memory, generate C and compile "
                                   "it with arm-none-eabi-gcc for the board; prints flash/RAM use. A model "
                                   "that does not fit is refused, naming the region and the overflow.")
    p.add_argument("model", help="a recipe name (vit-mnist), a model directory, a .pt2 or an int8 .tflite file")
    add_board_args(p)
    p.set_defaults(func=run)


def run(args):
    from tools.run_board import build
    built = build(args)
    fw = built.firmware
    print(f"model {built.name} ({built.kind}): {built.macs:,} MACs, arena {built.plan.arena_bytes:,} B "
          f"({built.schedule.name} schedule), weights {built.graph.const_bytes():,} B")
    print(f"sources {built.source_dir}")
    print(f"firmware {fw.summary()}")
    return 0

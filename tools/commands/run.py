"""`tinyshield run`: one inference, either on an edge backend (torch, LiteRT, TFLite Micro) or on a board."""


def register(sub):
    p = sub.add_parser("run", help="run inference on a backend (torch/litert/tflm) or on a board",
                       description="Run MODEL on INPUT... Without --board: an edge backend on this machine. "
                                   "With --board: on the (emulated or real) board over the serial link.")
    p.add_argument("model", help="model: a recipe name, 'minilm', a model directory, a .tflite or a .pt2 file")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="sentences for text models; for image models an image file (.png/.npy) or mnist:INDEX; "
                        "for a .pt2 model an .npy file holding one input")
    p.add_argument("--backend", choices=["torch", "litert", "tflm"], default="litert",
                   help="edge backend when no --board is given (default: litert)")
    p.add_argument("--int8", action="store_true", help="use the int8 model (edge backends)")
    p.add_argument("--threads", type=int, default=None, help="interpreter threads (litert)")
    p.add_argument("--seq-len", type=int, default=None, help="fixed sequence length for text models")
    p.add_argument("--board", default=None, help="run on this board (e.g. stm32f405) instead of an edge backend")
    p.add_argument("--calib", default="500", metavar="N|FILE",
                   help="int8 calibration on a board: N recipe inputs, or a .npy/.npz file (needed for a .pt2)")
    p.add_argument("--url", default=None, help="serial URL of an already running board (socket://127.0.0.1:PORT, /dev/ttyACM0)")
    p.set_defaults(func=run)


def run(args):
    if args.board or args.url:
        from tools.run_board import run_on_board
        return run_on_board(args)
    from tools.run_backend import run_on_backend
    return run_on_backend(args)

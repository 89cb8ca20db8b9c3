"""`tinyshield protect MODEL`: write a protected bundle (sealed enclave part + the accelerator's model)."""



def register(sub):
    from tee.modes import MODES
    p = sub.add_parser("protect", help="protect a model for inference on an untrusted accelerator",
                       description="Seal MODEL for the simulated enclave and write the transformed linear layers "
                                   "for the untrusted accelerator. Modes: shadownet (ShadowNet weight transform + "
                                   "input masks), blinded (Slalom: one-time masks in Z_p + Freivalds checks), "
                                   "enclave-only, plain, sliced (TEESlice: only a public backbone's weights leave "
                                   "the enclave, blinded and checked; the private adapters and head stay inside).")
    p.add_argument("model", help="'minilm', a recipe name (e.g. vit-mnist; minilm-sliced-sst2 for --mode sliced), a "
                                 "model directory or a .pt2 file (torch.export.save; sealed into the bundle, its "
                                 "example gives the input shapes)")
    p.add_argument("--mode", choices=MODES, default="blinded", help="protection mode (default: blinded)")
    p.add_argument("--out", default=None, help="bundle directory (default: build/protected/<model>-<mode>)")
    p.add_argument("--seq-len", type=int, default=128, help="fixed sequence length for text models (default 128)")
    p.add_argument("--pads", type=int, default=8,
                   help="blinded, sliced: one-time pads to precompute (one per inference; more are made on demand)")
    p.add_argument("--fake-ratio", type=float, default=0.25, help="shadownet: fake channels per real channel")
    p.add_argument("--mask-pool", type=int, default=4, help="shadownet: precomputed input masks per layer")
    p.add_argument("--no-litert", action="store_true", help="do not export .tflite layers (torch accelerator only)")
    p.set_defaults(func=run)


def run(args):
    from pathlib import Path

    from base.errors import TinyshieldError
    from edge.models.registry import resolve
    from base.paths import build_dir
    from tee.bundle import protect

    if args.seq_len < 1 or args.seq_len > 512:
        raise TinyshieldError(f"--seq-len must be in 1..512, got {args.seq_len}")
    pt2 = args.model.endswith(".pt2")
    model = Path(args.model) if pt2 else resolve(args.model).model
    name = Path(args.model).stem if pt2 else Path(args.model).name if Path(args.model).is_dir() else args.model
    out = Path(args.out) if args.out else build_dir() / "protected" / f"{name}-{args.mode}"
    b = protect(model, out, args.mode, seq_len=args.seq_len, pads=args.pads, fake_ratio=args.fake_ratio,
                mask_pool=args.mask_pool, litert=not args.no_litert)
    print(f"{args.mode} bundle for {name} at {b.path} ({b.seconds:.1f} s)")
    print(f"  measurement {b.header['measurement']}")
    print(f"  accelerator backend {b.header['accelerator']['backend']}, {len(b.header['accelerator']['layers'])} layers")
    from tee.modes import get
    if get(args.mode).pads and args.pads:
        from tee.fieldgemm import chosen
        print(f"  pads made with the exact field GEMM {chosen().name} (this CPU's fastest that passes the self-test)")
    for k, v in b.sizes.items():
        print(f"  {k}: {v / 1e6:.1f} MB")
    return 0

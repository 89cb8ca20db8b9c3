"""`tinyshield infer --protected BUNDLE INPUT...`: attest the enclave, then run protected inference."""
from __future__ import annotations

import argparse


def register(sub):
    p = sub.add_parser("infer", help="protected inference with a bundle from `tinyshield protect`",
                       description="Start the enclave (1 thread) and the untrusted accelerator (all cores), verify "
                                   "the enclave's attestation, then run one inference per INPUT.")
    p.add_argument("--protected", required=True, metavar="BUNDLE", help="bundle directory")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="sentences for text models; mnist:INDEX or a "
                                                              "28x28 .npy/.png for image models")
    p.add_argument("--backend", choices=["litert", "torch"], default=None,
                   help="accelerator backend (default: the bundle's, litert when exported)")
    p.add_argument("--accel-threads", type=int, default=None, help="accelerator threads (default: all cores)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="pipeline the encoder's rows so enclave and accelerator work at the same time, polling for "
                        "messages (default: on when two cores are free now, where it is faster; see tools/bench/tee.py)")
    p.set_defaults(func=run)


def run(args):
    import numpy as np

    from base.errors import TinyshieldError
    from tee.bundle import load_header
    from tee.client import ProtectedSession
    from tee.inputs import bundle_inputs

    bundle = load_header(args.protected)
    inputs = bundle_inputs(bundle.header, args.inputs)
    if args.accel_threads is not None and args.accel_threads < 1:
        raise TinyshieldError("--accel-threads must be >= 1")
    outs = []
    with ProtectedSession(bundle.path, backend=args.backend, accel_threads=args.accel_threads,
                          overlap=args.overlap) as s:
        print(f"enclave attested: measurement {s.quote.measurement.hex()[:16]}…, mode {bundle.mode}, "
              f"accelerator {s.backend}")
        from tee.modes import get
        if get(bundle.mode).backend == "field":
            st = s.accelerator_stats()
            print(f"accelerator's exact field GEMM: {st['kernel']}"
                  + (f" ({st['kernel_note']})" if st["kernel_note"] else ""))
        for text, inp in zip(args.inputs, inputs):
            y, t = s.infer(inp)
            outs.append(y[0])
            if bundle.header["kind"] == "vit" or y.shape[-1] <= 16:
                what = f"class {int(y[0].argmax())} (logits {np.array2string(y[0], precision=2)})"
            else:
                what = f"embedding dim {y.shape[-1]}, first {np.array2string(y[0][:4], precision=4)}"
            print(f"{text[:40]!r}: {what}")
            print(f"  {t.total_s * 1e3:.1f} ms: enclave {t.enclave_s * 1e3:.1f}, accelerator {t.accelerator_s * 1e3:.1f}, "
                  f"transfer {t.transfer_s * 1e3:.1f}, overlapping {t.overlap_s * 1e3:.1f} ms; {t.calls} calls"
                  + (f", pad made on the spot {t.offline_s * 1e3:.0f} ms" if t.offline_s else ""))
    if len(outs) > 1 and bundle.header["kind"] not in ("vit",) and outs[0].shape[-1] > 16:
        e = np.stack(outs)
        print("cosine similarities:\n" + np.array2string(e @ e.T, precision=3))
    return 0

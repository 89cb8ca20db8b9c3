"""`tinyshield audit BUNDLE`: run the attack suite on a protected bundle and print what leaks."""
from __future__ import annotations


def register(sub):
    p = sub.add_parser("audit", help="attack a protected bundle: transcript leaks, weight recovery, lying accelerator, sealing",
                       description="Runs the audit suite on BUNDLE as its owner (unseals it with the device key to "
                                   "score the attacks). Writes JSON next to the bundle (audit.json).")
    p.add_argument("bundle", help="bundle directory from `tinyshield protect`")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="inputs to send (default: two built-in ones)")
    p.add_argument("--trials", type=int, default=1000, help="malicious-accelerator trials per attack (default 1000)")
    p.add_argument("--public", default=None, help="a public model the attacker holds (e.g. minilm); default: "
                                                  "MiniLM for MiniLM bundles, else the true weights plus noise")
    p.add_argument("--no-sealing", action="store_true", help="skip the sealing/attestation checks")
    p.set_defaults(func=run)


def default_inputs(header: dict) -> list[str]:
    if "image" in header["enclave_config"]["input"]:
        return ["mnist:0", "mnist:1"]
    return ["The film was a delight from start to finish.", "Interest rates rose again this quarter."]


def run(args):
    import json

    from rich.console import Console
    from rich.table import Table

    from base.errors import TinyshieldError
    from tee import audit, program
    from tee.bundle import load_header
    from tee.inputs import bundle_inputs

    if args.trials < 0:
        raise TinyshieldError("--trials must be >= 0")
    bundle = load_header(args.bundle)
    inputs = bundle_inputs(bundle.header, args.inputs or default_inputs(bundle.header))
    if len(inputs) < 2:
        raise TinyshieldError("give at least two inputs (the audit compares calls)")
    public = None
    if args.public or bundle.header["kind"] in ("minilm", "bert") and bundle.header["enclave_config"]["model"].get("hidden_size") == 384:
        from edge.models.registry import resolve
        from edge.models.bert import served
        from tee.bundle import captured
        known = captured(served(resolve(args.public or "minilm").model), bundle.header["enclave_config"]["input"])
        public = {k: w for k, (w, _) in program.linears(known).items()}
    r = audit.run_audit(bundle.path, inputs, trials=args.trials, public=public, sealing=not args.no_sealing)
    con = Console()
    from tee.modes import get
    mode = get(r.mode)
    if mode.checked:
        con.print(f"accelerator's exact field GEMM: {r.kernel}" + (f" ({r.kernel_note})" if r.kernel_note else "")
                  + f"; lying-accelerator trials here: {r.detection_kernel}")
    t = r.transcript
    tab = Table(title=f"what the accelerator saw ({r.mode})")
    for c in ("calls", "max |cos| to plaintext", "chance level", "rows matched", "identical on repeat", "mask-reuse pairs"):
        tab.add_column(c)
    tab.add_row(str(t.calls), f"{t.max_row_cos:.3f}", f"{t.chance_cos:.3f}", str(t.rows_matched),
                str(t.repeated_input_identical), f"{t.mask_reuse_pairs}/{t.pairs_checked}")
    con.print(tab)
    w = r.weights
    con.print(f"weights {'EXPOSED' if w.exposed else 'not exposed'} to the accelerator: mean best |cos| "
              f"{w.mean_best_cos:.4f}, rows matched {w.share_rows_matched:.1%}")
    if r.shadow:
        tab = Table(title="ShadowNet weight recovery")
        for c in ("layer", "channels", "fakes", "normalise+match cos", "fake AUC (statistics)", "public match share",
                  "fakes by public match", "recovered cos", "public-only cos"):
            tab.add_column(c)
        for s in r.shadow:
            tab.add_row(s.layer, str(s.channels), str(s.fakes), f"{s.normalise_match_cos:.4f}",
                        f"{s.fake_auc:.2f}", f"{s.public_match_share:.2f}", f"{s.public_fake_accuracy:.2f}",
                        f"{s.public_recovered_cos:.4f}", f"{s.public_only_cos:.4f}")
        con.print(tab)
    if r.private is not None:
        p = r.private
        con.print(f"private slices ({p.tensors} tensors, {p.vectors} vectors) in what the accelerator holds: best "
                  f"|cos| {p.max_cos_weights:.3f}, in what it received: {p.max_cos_transcript:.3f} (chance "
                  f"{p.chance_cos:.3f}); matched {p.matched}")
    if mode.outsources and not mode.checked:
        con.print(f"lying accelerator: {r.mode} has no integrity check — every altered result is accepted")
    if r.detection and mode.checked:
        tab = Table(title="lying accelerator")
        for c in ("attack", "trials", "detected", "rate", "theoretical miss"):
            tab.add_column(c)
        for d in r.detection:
            tab.add_row(d.attack, str(d.trials), str(d.detected), f"{d.rate:.4f}", f"{d.theoretical_miss:.2e}")
        con.print(tab)
    for s in r.sealing:
        con.print(f"{s.check}: {'refused' if s.refused else 'ACCEPTED'} — {s.message[:100]}")
    out = bundle.path / "audit.json"
    out.write_text(json.dumps(r.to_dict(), indent=1))
    con.print(f"written {out}")
    return 0

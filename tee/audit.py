"""The attack suite: what the untrusted side sees and can do, measured.

- transcript: everything the accelerator received, checked for plaintext inputs/activations (after
  normalising and matching rows) and for mask reuse between calls;
- weights: normalise-and-match of the accelerator's model against the true weights (which modes expose them);
- ShadowNet weight recovery: fake-channel detection by row statistics, matching against a public model;
- malicious accelerator: flipped entry, tiny perturbation, swapped channels, replayed output, over many
  trials, against the blinded mode's Freivalds check (theoretical miss rate 1/p per check);
- sealing: tampered ciphertext, wrong measurement, replayed attestation must be refused;
- each mode's own attacks (tee.modes: its `audit` hook), e.g. the sliced mode's search for its private slices in
  everything the accelerator held and received. Model stealing and membership inference: tee.stealing.
The auditor is the model owner: it unseals the bundle with the device root key to score the attacks.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from base.errors import TinyshieldError
from tee import blinded
from tee.accelerator import ATTACKS, tamper
from tee.fieldmath import HALF, P, from_digits


# ---- row matching ---------------------------------------------------------------------------------
def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    a = a - a.mean(axis=1, keepdims=True) if a.shape[1] > 1 else a
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)


def best_abs_cos(found: np.ndarray, truth: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `truth`, the best |cosine| over rows of `found` and its index (normalise-and-match)."""
    f, t = _unit(found), _unit(truth)
    best, idx = np.zeros(len(t)), np.zeros(len(t), dtype=np.int64)
    for i in range(0, len(t), chunk):
        c = np.abs(t[i:i + chunk] @ f.T)
        best[i:i + chunk], idx[i:i + chunk] = c.max(1), c.argmax(1)
    return best, idx


def as_float(sent: np.ndarray) -> np.ndarray:
    """What an attacker would analyse: floats as they are, field elements (or their digit planes) centred."""
    if sent.dtype == np.uint8:
        sent = from_digits(sent)
    if sent.dtype == np.uint32:
        a = sent.astype(np.int64)
        return np.where(a > HALF, a - P, a).astype(np.float64)
    return sent.astype(np.float64)


# ---- weights ---------------------------------------------------------------------------------------
@dataclass
class WeightExposure:
    mode: str
    exposed: bool
    mean_best_cos: float          # over true rows, best |cos| with a row the accelerator holds
    share_rows_matched: float     # share of true rows found with |cos| > 0.99


def weight_exposure(mode: str, accel_weights: dict[str, np.ndarray], true: dict[str, tuple[np.ndarray, np.ndarray]]) -> WeightExposure:
    if not accel_weights:
        return WeightExposure(mode, False, 0.0, 0.0)
    cos = []
    for name, wt in accel_weights.items():
        b, _ = best_abs_cos(np.asarray(wt, dtype=np.float64).T, true[name][0])
        cos.append(b)
    c = np.concatenate(cos)
    return WeightExposure(mode, bool((c > 0.99).mean() > 0.5), float(c.mean()), float((c > 0.99).mean()))


@dataclass
class ShadowAttack:
    layer: str
    channels: int
    fakes: int
    normalise_match_cos: float     # mean best |cos| of true rows among normalised obfuscated rows
    fake_auc: float                # ROC AUC of the row statistic separating fake from real rows (0.5 = chance)
    fake_balanced_accuracy: float  # (recall on fakes + recall on real rows) / 2 of a two-cluster split of it
    fake_recall: float
    public_match_share: float      # share of real channels placed at the right position by public-model matching
    public_fake_accuracy: float    # share of rows labelled right when "claimed by no public row" means fake
    public_recovered_cos: float    # cosine (whole matrix) of recovered weights vs the protected ones
    public_only_cos: float         # the public model's own cosine to the protected weights (the baseline)


def fake_scores(obf: np.ndarray, k: int | None = None) -> np.ndarray:
    """Row statistic: the share of a row's energy in the layer's top-k principal directions.

    Trained rows share a low-dimensional structure; random fake rows spread their energy evenly."""
    u = obf.astype(np.float64)
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-30)
    k = k or max(1, min(20, len(u) // 10))
    _, _, vt = np.linalg.svd(u, full_matrices=False)
    return ((u @ vt[:k].T) ** 2).sum(1)


def two_means(x: np.ndarray) -> np.ndarray:
    """1-D two-cluster split (Lloyd's iterations); True = the low cluster."""
    lo, hi = np.percentile(x, 10), np.percentile(x, 90)
    for _ in range(50):
        low = np.abs(x - lo) < np.abs(x - hi)
        if low.all() or (~low).all():
            break
        lo, hi = x[low].mean(), x[~low].mean()
    return np.abs(x - lo) < np.abs(x - hi)


def public_match(found: np.ndarray, w_public: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recover a layer from rows the accelerator holds (scaled, shuffled, mixed with fakes) with a public model:
    each public row claims its best row, rescaled by its projection on the public row. (recovered W, row indices)"""
    _, idx = best_abs_cos(found, w_public)
    rec = np.zeros(w_public.shape, dtype=np.float64)
    for i, j in enumerate(idx):
        o = found[j].astype(np.float64)
        a = (o @ w_public[i]) / max(float(w_public[i] @ w_public[i]), 1e-30)
        rec[i] = o / (a if abs(a) > 1e-30 else 1.0)
    return rec, idx


def shadow_attacks(name: str, obf: np.ndarray, fake: np.ndarray, perm: np.ndarray, w_true: np.ndarray,
                   w_public: np.ndarray) -> ShadowAttack:
    from sklearn.metrics import roc_auc_score
    best, _ = best_abs_cos(obf, w_true)
    scores = fake_scores(obf)
    guess_fake = two_means(scores)
    auc = float(roc_auc_score(fake, -scores))
    balanced = float(((guess_fake & fake).sum() / max(fake.sum(), 1) + (~guess_fake & ~fake).sum() / max((~fake).sum(), 1)) / 2)
    rec, pub_idx = public_match(obf, w_public)

    def cos(a, b):
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))

    return ShadowAttack(name, int(w_true.shape[0]), int(fake.sum()), float(best.mean()), auc, balanced,
                        float((guess_fake & fake).sum() / max(fake.sum(), 1)),
                        float((pub_idx == perm).mean()), float((~np.isin(np.arange(len(obf)), pub_idx) == fake).mean()),
                        cos(rec, w_true), cos(w_public, w_true))


# ---- malicious accelerator -------------------------------------------------------------------------
@dataclass
class Detection:
    attack: str
    trials: int
    detected: int
    rate: float
    theoretical_miss: float


def detection_trials(w: np.ndarray, b: np.ndarray, rows: int, trials: int = 1000, seed: int = 0,
                     attacks: tuple[str, ...] = ATTACKS) -> list[Detection]:
    """Run the blinded protocol for one layer `trials` times per attack with a lying accelerator.

    Each trial uses a fresh pad (mask, unblinding factor, Freivalds vector), a fresh input, the real
    accelerator kernel and the real check; the liar derives its answer from the honest one."""
    rng = np.random.default_rng(seed)
    x_calib = rng.standard_normal((rows, w.shape[1])).astype(np.float32)
    layer = blinded.make_layer(w, b, x_calib)
    out = []
    for attack in attacks:
        detected, previous = 0, None
        for _ in range(trials):
            pad = blinded.make_pad({"l": layer}, {"l": rows})
            x = torch.from_numpy((rng.standard_normal((rows, w.shape[1])) * 0.5).astype(np.float32))
            xt, rhs = blinded.blind(x, layer, pad["l.r"], pad["l.v"])
            honest = layer.gemm.planes(xt)
            lie = tamper(attack, honest, previous, rng)
            previous = honest
            if np.array_equal(lie, honest):   # a replay with nothing stale yet is no attack
                continue
            detected += blinded.unblind(lie, pad["l.u"], pad["l.s"], rhs, layer) is None
        n = trials - (1 if attack == "replay" else 0)
        out.append(Detection(attack, n, detected, detected / max(n, 1), 1.0 / P))
    return out


MIN_DIM = 32


# ---- transcript ------------------------------------------------------------------------------------
@dataclass
class TranscriptReport:
    mode: str
    calls: int
    max_row_cos: float            # best |cos| of any sent row with any plaintext row of the same layer
    chance_cos: float             # the same statistic for random Gaussian rows of the same shapes
    rows_matched: int             # sent rows with |cos| > 0.99 to a plaintext row
    repeated_input_identical: int # calls whose data was byte-identical when the same input was sent twice
    mask_reuse_pairs: int         # call pairs whose difference equals the plaintext difference (mask reused)
    pairs_checked: int


def whole_calls(transcript: list[tuple[str, np.ndarray]], rows: dict[str, int]) -> list[tuple[str, np.ndarray]]:
    """The transcript with each layer's row parts (sent one after the other by the pipelined enclave) joined
    into one call of `rows[name]` rows; blinded digit planes become the field elements they carry."""
    out: list[tuple[str, list[np.ndarray]]] = []
    for name, x in transcript:
        x = from_digits(x) if x.dtype == np.uint8 else x
        if out and out[-1][0] == name and sum(len(a) for a in out[-1][1]) < rows[name]:
            out[-1][1].append(x)
        else:
            out.append((name, [x]))
    return [(name, np.concatenate(parts)) for name, parts in out]


def transcript_report(mode: str, transcript: list[tuple[str, np.ndarray]],
                      plain: list[dict[str, np.ndarray]]) -> TranscriptReport:
    """`transcript` covers len(plain) inferences in order; the last input repeats the first. `plain` holds each
    inference's plaintext inputs of every linear layer (name -> rows x in)."""
    from tee import modes
    field = modes.get(mode).backend == "field"
    n_inf = len(plain)
    if not transcript:
        return TranscriptReport(mode, 0, 0.0, 0.0, 0, 0, 0, 0)
    calls = whole_calls(transcript, {name: len(a) for name, a in plain[0].items()})
    per_inf = len(calls) // n_inf
    by_inf = [calls[i * per_inf:(i + 1) * per_inf] for i in range(n_inf)]
    max_cos = chance = 0.0
    matched = 0
    rng = np.random.default_rng(0)
    for calls, acts in zip(by_inf, plain):
        for name, sent in calls:
            if sent.shape[1] < MIN_DIM:   # in a handful of dimensions every cosine is large
                continue
            best, _ = best_abs_cos(acts[name], as_float(sent))
            max_cos = max(max_cos, float(best.max()))
            matched += int((best > 0.99).sum())
            noise, _ = best_abs_cos(acts[name], rng.standard_normal(sent.shape))
            chance = max(chance, float(noise.max()))
    identical = sum(np.array_equal(a[1], b[1]) for a, b in zip(by_inf[0], by_inf[-1]))
    reuse = pairs = 0
    for i in range(n_inf):
        for j in range(i + 1, n_inf):
            for (name, si), (_, sj) in zip(by_inf[i], by_inf[j]):
                d_sent = as_float(si) - as_float(sj)
                d_plain = plain[i][name].astype(np.float64) - plain[j][name].astype(np.float64)
                pairs += 1
                if field:
                    continue   # differences of field elements are uniform: covered by max_row_cos
                if np.linalg.norm(d_plain) == 0:
                    reuse += bool(np.allclose(d_sent, 0, atol=1e-3))
                else:
                    c = float(d_sent.ravel() @ d_plain.ravel() / (np.linalg.norm(d_sent) * np.linalg.norm(d_plain) + 1e-30))
                    reuse += c > 0.999
    return TranscriptReport(mode, len(transcript), max_cos, chance, matched, int(identical), reuse, pairs)


# ---- sealing ----------------------------------------------------------------------------------------
@dataclass
class SealingCheck:
    check: str
    refused: bool
    message: str


def sealing_checks(bundle_dir: Path) -> list[SealingCheck]:
    """Tampered ciphertext and a changed enclave config (= another measurement) must not unseal; a replayed
    quote must not pass attestation. The first two run the enclave's own start-up code on altered copies."""
    from tee.client import ProtectedSession
    from tee.enclave import Enclave
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for check in ("tampered ciphertext", "wrong measurement"):
            copy = Path(tmp) / check.replace(" ", "-")
            copy.mkdir()
            shutil.copy(bundle_dir / "bundle.json", copy / "bundle.json")
            shutil.copy(bundle_dir / "enclave.sealed", copy / "enclave.sealed")
            if check == "tampered ciphertext":
                blob = bytearray((copy / "enclave.sealed").read_bytes())
                blob[len(blob) // 2] ^= 0x01
                (copy / "enclave.sealed").write_bytes(bytes(blob))
            else:
                header = json.loads((copy / "bundle.json").read_text())
                header["enclave_config"]["params"]["audit"] = "changed"
                (copy / "bundle.json").write_text(json.dumps(header))
            out.append(_refused(check, lambda: Enclave(copy)))
    with ProtectedSession(bundle_dir, accel_threads=1) as s:
        old = s.quote
        out.append(_refused("replayed attestation", lambda: s.attest(quote=old)))
    return out


def _refused(check: str, fn) -> SealingCheck:
    try:
        fn()
    except TinyshieldError as e:
        return SealingCheck(check, True, str(e))
    return SealingCheck(check, False, "accepted")


@dataclass
class AuditReport:
    bundle: str
    mode: str
    transcript: TranscriptReport | None = None
    weights: WeightExposure | None = None
    shadow: list[ShadowAttack] = field(default_factory=list)
    detection: list[Detection] = field(default_factory=list)
    sealing: list[SealingCheck] = field(default_factory=list)
    kernel: str = "none"          # blinded: the accelerator's exact field GEMM kernel (tee.fieldgemm) ...
    kernel_note: str = ""         # ... and why faster ones were not used
    detection_kernel: str = "none"   # the kernel of the lying-accelerator trials (this process's choice)
    private: object = None        # sliced: the private slices looked for in what the accelerator holds and saw

    def to_dict(self) -> dict:
        return asdict(self)


def run_audit(bundle_dir: str | Path, inputs: list[dict[str, np.ndarray]], trials: int = 1000,
              public: dict[str, np.ndarray] | None = None, shadow_layers: int = 8, detection_layer: str | None = None,
              sealing: bool = True, seed: int = 0) -> AuditReport:
    """The whole suite on one bundle. `inputs`: two or more model inputs (the first is sent again at the end).
    `public`: weights (name -> W) of a public model the attacker may hold; None uses the true weights plus
    noise of half their size, a stand-in for a related public checkpoint."""
    from safetensors.numpy import load_file

    from tee.bundle import load_header, record_inputs
    from tee.client import ProtectedSession
    from tee.enclave import Enclave
    from tee.modes import AuditArgs, get

    bundle = load_header(bundle_dir)
    owner = Enclave(bundle.path)                 # the owner's view: plaintext weights and secrets
    report = AuditReport(str(bundle.path), bundle.mode)
    seq = list(inputs) + [inputs[0]]
    with ProtectedSession(bundle.path, record=True) as s:
        for inp in seq:
            s.infer(inp)
        transcript = s.transcript()
        stats = s.accelerator_stats()
    report.kernel, report.kernel_note = stats["kernel"], stats["kernel_note"]
    plain = [record_inputs(owner.prog, [inp]) for inp in seq]
    report.transcript = transcript_report(bundle.mode, transcript, plain)

    wfile = bundle.path / "accelerator" / "weights.safetensors"
    accel = load_file(str(wfile)) if wfile.is_file() else {}
    report.weights = weight_exposure(bundle.mode, accel, owner.params)

    args = AuditArgs(public, np.random.default_rng(seed), trials, detection_layer, shadow_layers, seed, transcript)
    get(bundle.mode).audit(report, owner, accel, args)    # the mode's own attacks (tee.modes)
    if sealing:
        report.sealing = sealing_checks(bundle.path)
    return report

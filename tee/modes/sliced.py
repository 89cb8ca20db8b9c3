"""sliced (TEESlice, S&P'24): partition before training. The accelerator holds only PUBLIC weights -- the published
backbone's linears, int8 -- and computes on one-time-blinded inputs, every answer checked with Freivalds (the blinded
mode's protocol). The owner's private slices -- low-rank adapters (x B^T A^T, added in the enclave), the trained
biases and LayerNorms, the task head -- and attention, softmax, GELU, LayerNorm and pooling stay in the enclave.
The model is partitioned when it is trained (edge.models.sliced, edge.recipes.minilm_task); protect refuses any
outsourced weight that is not a published one."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from base.errors import TinyshieldError
from tee.modes import Prep, Prepared
from tee.modes.blinded import Blinded


@functools.lru_cache(maxsize=1)
def public_rows() -> frozenset[bytes]:
    """Every row of every linear weight of the published all-MiniLM-L6-v2 (as float32 bytes)."""
    from edge.models.minilm import load_minilm
    return frozenset(row.tobytes() for k, v in load_minilm().state_dict().items()
                     if k.startswith("encoder.") and k.endswith(".weight") and v.ndim == 2
                     for row in v.numpy().astype(np.float32))


def check_public(params: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    rows = public_rows()
    for name, (w, _) in params.items():
        for i, row in enumerate(np.ascontiguousarray(w, dtype=np.float32)):
            if row.tobytes() not in rows:
                raise TinyshieldError(f"sliced mode: layer {name} (row {i}) holds weights that are not the published "
                                      "all-MiniLM-L6-v2's; only public weights may leave the enclave -- train the "
                                      "private part with a sliced recipe (tinyshield train minilm-sliced-sst2)")


@dataclass
class PrivateExposure:
    tensors: int                # private tensors of the sealed model
    vectors: int                # their rows and columns of at least MIN_DIM entries, each looked for
    max_cos_weights: float      # best |cos| of any of them with a row or column of the accelerator's model
    max_cos_transcript: float   # ... with any row the accelerator received (field elements, centred)
    chance_cos: float           # the same statistics for random Gaussian vectors of the same shapes
    matched: int                # private vectors found with |cos| > 0.99 (in the model file or the transcript)


def private_vectors(state: dict[str, np.ndarray], public: set[str], min_dim: int) -> tuple[int, dict[int, list]]:
    """Length -> private vectors: every row and column (of >= min_dim entries) of the non-public tensors."""
    by_len: dict[int, list] = {}
    n = 0
    for k, v in state.items():
        if k in public or v.ndim == 0 or v.dtype.kind not in "f":
            continue
        n += 1
        m = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v[None]
        for a in (m, m.T):
            if a.shape[1] >= min_dim:
                by_len.setdefault(a.shape[1], []).append(a)
    return n, {k: np.concatenate(v) for k, v in by_len.items()}


def private_exposure(model, accel: dict[str, np.ndarray], transcript, min_dim: int) -> PrivateExposure:
    from tee.audit import as_float, best_abs_cos
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    n, private = private_vectors(state, model.public_state_names(), min_dim)
    held: dict[int, list] = {}
    for w in accel.values():
        for a in (w, w.T):
            held.setdefault(a.shape[1], []).append(np.asarray(a, np.float64))
    sent: dict[int, list] = {}
    for _, x in transcript:
        f = as_float(x)
        sent.setdefault(f.shape[1], []).append(f)
    rng = np.random.default_rng(0)
    best = {"w": 0.0, "t": 0.0, "chance": 0.0}
    matched = 0
    for length, vecs in private.items():
        for key, pool in (("w", held), ("t", sent)):
            if length not in pool:
                continue
            found = np.concatenate(pool[length])
            c, _ = best_abs_cos(found, vecs)
            best[key] = max(best[key], float(c.max()))
            matched += int((c > 0.99).sum())
            noise, _ = best_abs_cos(found, rng.standard_normal(vecs.shape))
            best["chance"] = max(best["chance"], float(noise.max()))
    return PrivateExposure(n, sum(len(v) for v in private.values()), best["w"], best["t"], best["chance"], matched)


class Sliced(Blinded):
    name = "sliced"
    summary = ("sliced (TEESlice: public backbone blinded + checked on the accelerator; private adapters, "
               "head and non-linears in the enclave)")

    def outsourced(self, model) -> frozenset[str]:
        if not hasattr(model, "public_linears"):
            raise TinyshieldError(f"sliced mode protects a model partitioned before training (public backbone + "
                                  f"private slices), not a {type(model).__name__}: train one with "
                                  "`tinyshield train minilm-sliced-sst2`")
        return frozenset(model.public_linears())

    def prepare(self, prep: Prep) -> Prepared:
        check_public(prep.params)
        return super().prepare(prep)

    def audit(self, report, owner, accel, args):
        from tee.audit import MIN_DIM
        super().audit(report, owner, accel, args)
        report.private = private_exposure(owner.model, accel, args.transcript, MIN_DIM)


MODE = Sliced()

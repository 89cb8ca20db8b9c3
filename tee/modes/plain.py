"""plain: the baseline. The accelerator holds the weights in the clear and sees every activation."""
from __future__ import annotations

import numpy as np
import torch

from tee.modes import Mode, Prep, Prepared


class PlainSide:
    def __init__(self, enc):
        self.enc = enc
        self.bias = {k: torch.from_numpy(b) for k, (_, b) in enc.params.items()}
        self.out_dims = {n: w.shape[0] for n, (w, _) in enc.params.items()}

    def submitter(self, pad=None):
        link = self.enc.link

        def submit(name, x, rows):
            seq = link.submit(name, x.contiguous().numpy())
            return lambda: torch.from_numpy(link.collect(seq)) + self.bias[name]
        return submit


class Plain(Mode):
    name = "plain"
    summary = "plain (weights and activations in the clear: the baseline)"
    litert = True

    def prepare(self, prep: Prep) -> Prepared:
        return Prepared(accel={n: np.ascontiguousarray(w.T) for n, (w, _) in prep.params.items()})

    def enclave(self, enc, sealed):
        return PlainSide(enc)

    def recover(self, accel, public):
        return {n: np.asarray(w, np.float64).T for n, w in accel.items()}    # in the clear


MODE = Plain()

"""shadownet (S&P'23): transformed weights (scales, fake channels, shuffling) and inputs masked from a small pool.
The transform itself is tee.shadownet; the audit recovers the weights anyway (TEESlice)."""
from __future__ import annotations

import secrets as pysecrets

import numpy as np
import torch

from tee import shadownet
from tee.modes import Mode, Prep, Prepared


class ShadowSide:
    def __init__(self, enc, sealed):
        self.enc = enc
        self.layers = {n: (shadownet.ShadowLayer(obf=None, perm=sealed[f"sn.{n}.perm"], scale=sealed[f"sn.{n}.scale"],
                                                 fake=sealed[f"sn.{n}.fake"].astype(bool)),
                           sealed[f"sn.{n}.masks"], sealed[f"sn.{n}.mask_out"]) for n in enc.params}
        self.out_dims = {n: len(sealed[f"sn.{n}.fake"]) for n in enc.params}

    def submitter(self, pad=None):
        link, params = self.enc.link, self.enc.params

        def submit(name, x, rows):
            layer, masks, mask_out = self.layers[name]
            j = pysecrets.randbelow(len(masks))
            seq = link.submit(name, (x.numpy() + masks[j][rows]).astype(np.float32))
            return lambda: torch.from_numpy(shadownet.restore(link.collect(seq), mask_out[j][rows], layer,
                                                              params[name][1]))
        return submit


class ShadowNet(Mode):
    name = "shadownet"
    summary = "shadownet (ShadowNet weight transform + input masks)"
    litert = True
    calibrates = True

    def prepare(self, prep: Prep) -> Prepared:
        fake_ratio, pool = prep.options["fake_ratio"], prep.options["mask_pool"]
        out = Prepared(params={"fake_ratio": fake_ratio, "mask_pool": pool})
        for name, (w, _) in prep.params.items():
            layer = shadownet.transform(w, prep.rng, fake_ratio)
            sigma = float(np.sqrt(np.mean(prep.calib_x[name] ** 2)))
            masks = shadownet.mask_pool(prep.rows[name], w.shape[1], sigma, pool, prep.rng)
            out.accel[name] = np.ascontiguousarray(layer.obf.T)
            out.secrets.update({f"sn.{name}.perm": layer.perm, f"sn.{name}.scale": layer.scale,
                                f"sn.{name}.fake": layer.fake.astype(np.uint8), f"sn.{name}.masks": masks,
                                f"sn.{name}.mask_out": (masks @ layer.obf.T).astype(np.float32)})
        return out

    def enclave(self, enc, sealed):
        return ShadowSide(enc, sealed)

    def recover(self, accel, public):
        from tee.audit import public_match
        return {n: public_match(w.T, public[n])[0] for n, w in accel.items() if n in public}

    def audit(self, report, owner, accel, args):
        from tee.audit import shadow_attacks
        public, rng = args.public, args.rng
        for name in list(owner.params)[:args.shadow_layers]:
            w_true = owner.params[name][0]
            if public is not None and name in public:
                w_pub = public[name]
            else:   # a stand-in for a related public checkpoint: the true weights plus noise of half their size
                w_pub = w_true + 0.5 * rng.standard_normal(w_true.shape).astype(np.float32) * \
                    np.linalg.norm(w_true, axis=1, keepdims=True) / np.sqrt(w_true.shape[1])
            sl = owner.side.layers[name][0]
            report.shadow.append(shadow_attacks(name, accel[name].T, sl.fake, sl.perm, w_true, w_pub))
        super().audit(report, owner, accel, args)


MODE = ShadowNet()

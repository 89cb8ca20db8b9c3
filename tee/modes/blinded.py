"""blinded (Slalom): int8 weights on the accelerator, inputs under one-time masks in Z_p, every answer checked
with Freivalds; the result equals the fixed-point reference bit for bit. The arithmetic is tee.blinded."""
from __future__ import annotations

import functools

import numpy as np

from base.errors import TinyshieldError
from tee import blinded, fieldkernels
from tee.modes import Mode, Prep, Prepared


class BlindSide:
    def __init__(self, enc, sealed):
        self.enc = enc
        order = list(enc.params)                     # call order: which layer's pad entries come next
        self.following = dict(zip(order, order[1:]))
        self.layers = {n: blinded.BlindLayer(w_q=sealed[f"bl.{n}.w_q"], w_scale=sealed[f"bl.{n}.w_scale"],
                                             fx=int(sealed[f"bl.{n}.fx"][0]), bias=enc.params[n][1])
                       for n in enc.params}
        self.out_dims = {n: w.shape[0] for n, (w, _) in enc.params.items()}

    def make_pad(self) -> dict[str, np.ndarray]:
        return blinded.make_pad(self.layers, self.enc.config["rows"])

    def submitter(self, pad):
        link = self.enc.link

        def submit(name, x, rows):
            layer = self.layers[name]
            r = pad[f"{name}.r"][rows]
            if r.shape[0] != x.shape[0]:
                raise TinyshieldError(f"{name}: input has {x.shape[0]} rows, pads were made for {r.shape[0]}")
            planes = link.outbound(np.uint8, (3 * r.shape[0], r.shape[1]))
            planes, rhs = blinded.blind(x, layer, r, pad[f"{name}.v"], out=planes)
            seq = link.submit(name, planes, answer=(r.shape[0], np.uint32))

            def wait():
                # while the accelerator works, the pad entries needed next are brought into the cache (a wrong
                # guess, e.g. rows past a smaller next layer's end, costs nothing)
                u = pad[f"{name}.u"][rows]
                fieldkernels.prefetch(u)
                if name in self.following:
                    fieldkernels.prefetch(pad[f"{self.following[name]}.r"][rows])
                y = blinded.unblind(link.collect(seq, copy=False), u, pad[f"{name}.s"], rhs, layer)
                if y is None:
                    raise TinyshieldError(f"integrity check failed on {name}: the accelerator returned a wrong "
                                          "result (Freivalds); inference aborted")
                return y
            return wait
        return submit


class Blinded(Mode):
    name = "blinded"
    summary = "blinded (Slalom: one-time masks in Z_p + Freivalds checks)"
    backend = "field"
    calibrates = True
    checked = True
    pads = True

    def prepare(self, prep: Prep) -> Prepared:
        layers = {name: blinded.make_layer(w, b, prep.calib_x[name]) for name, (w, b) in prep.params.items()}
        out = Prepared(params={"p": blinded.P, "w_bits": blinded.W_BITS},
                       pad=functools.partial(blinded.make_pad, layers, prep.rows))
        for name, layer in layers.items():
            out.accel[name] = np.ascontiguousarray(layer.w_q.T.astype(np.int8))
            out.secrets.update({f"bl.{name}.w_q": layer.w_q, f"bl.{name}.w_scale": layer.w_scale,
                                f"bl.{name}.fx": np.array([layer.fx], dtype=np.int64)})
        return out

    def enclave(self, enc, sealed):
        return BlindSide(enc, sealed)

    def recover(self, accel, public):
        """int8 rows up to a scale each; the public row it matches gives the scale (least squares)."""
        out = {}
        for n, w in accel.items():
            if n in public:
                q, pub = np.asarray(w, np.float64).T, np.asarray(public[n], np.float64)
                out[n] = q * ((q * pub).sum(1) / np.maximum((q * q).sum(1), 1e-30))[:, None]
        return out

    def audit(self, report, owner, accel, args):
        from tee import fieldgemm
        from tee.audit import detection_trials
        if args.trials > 0:
            name = args.layer or next((n for n in owner.params if ".0." in n), next(iter(owner.params)))
            w, b = owner.params[name]
            report.detection = detection_trials(w, b, owner.config["rows"][name], args.trials, args.seed)
            report.detection_kernel = fieldgemm.chosen().name


MODE = Blinded()

"""The protection modes, one module each, registered in MODES.

A mode decides four things, each a hook of its `Mode` object:
- prepare (owner's machine, `tee.bundle.protect`): which linear layers leave the enclave (`outsourced`), what
  the accelerator holds and what is sealed for the enclave (`prepare`), and one-time pads (`Prepared.pad`);
- accelerator side (`tee.accelerator`): `backend` names how the untrusted side computes a layer -- "float"
  (fp32 x @ W^T) or "field" (exact x~ w_q^T mod p on digit planes) -- and `litert` whether fp32 layers are
  exported as .tflite;
- enclave side (`tee.enclave`): `enclave(enc, sealed)` returns the mode's state, whose `submitter` is the
  mode's linear layer (send, wait, check, restore);
- audit (`tee.audit.run_audit`): `audit` adds the mode's own attacks to the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from base.errors import TinyshieldError


@dataclass
class Prep:
    """What `prepare` gets: the outsourced layers, rows per call, recorded inputs, the owner's options."""
    params: dict[str, tuple[np.ndarray, np.ndarray]]   # name -> (W (out, in), b)
    rows: dict[str, int]
    calib_x: dict[str, np.ndarray]                     # name -> fp32 inputs seen on the calibration set
    rng: np.random.Generator
    options: dict                                      # fake_ratio, mask_pool


@dataclass
class Prepared:
    accel: dict[str, np.ndarray] = field(default_factory=dict)     # name -> what the accelerator holds (in, out)
    secrets: dict[str, np.ndarray] = field(default_factory=dict)   # sealed for the enclave, besides the model
    params: dict = field(default_factory=dict)                     # part of the enclave config (measured)
    pad: Callable[[], dict[str, np.ndarray]] | None = None         # makes one inference's one-time pad


@dataclass
class AuditArgs:
    """What a mode's audit hook may use besides the owner's view and the accelerator's weights."""
    public: dict[str, np.ndarray] | None   # weights of a public model the attacker holds (name -> W)
    rng: np.random.Generator
    trials: int                            # lying-accelerator trials per attack
    layer: str | None                      # the layer of those trials (None: one of the first block)
    shadow_layers: int
    seed: int
    transcript: list = field(default_factory=list)   # (layer, array) the accelerator received


class Mode:
    name = ""
    summary = ""             # one line for `tinyshield protect --help`
    backend = "float"        # how the accelerator computes: "float" or "field"
    litert = False           # fp32 layers exported as .tflite for the LiteRT accelerator
    calibrates = False       # prepare needs each layer's inputs on calibration data
    checked = False          # every answer of the accelerator is verified (a lie aborts the inference)
    pads = False             # one-time pads, sealed per inference (the enclave side's make_pad makes more)
    outsources = True        # any layer leaves the enclave at all

    def outsourced(self, model) -> frozenset[str] | None:
        """Module paths of the linears that may leave the enclave; None: every linear of the graph."""
        return None

    def prepare(self, prep: Prep) -> Prepared:
        return Prepared()

    def enclave(self, enc, sealed: dict[str, np.ndarray]):
        raise NotImplementedError

    def recover(self, accel: dict[str, np.ndarray], public: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model thief's estimate (name -> W (out, in)) of the outsourced layers from the accelerator's model
        file alone, helped by `public` (name -> W of the public model's same layers); {}: nothing to recover."""
        return {}

    def audit(self, report, owner, accel: dict[str, np.ndarray], args: AuditArgs) -> None:
        """Add this mode's attacks to `report` (tee.audit.AuditReport). Default: a mode without integrity check
        accepts every lie."""
        from tee.accelerator import ATTACKS
        from tee.audit import Detection
        if args.trials > 0 and self.outsources:
            report.detection = [Detection(a, 0, 0, 0.0, 1.0) for a in ATTACKS]


def _table() -> dict[str, Mode]:
    from tee.modes import blinded, enclave_only, plain, shadownet, sliced
    return {m.name: m for m in (shadownet.MODE, blinded.MODE, enclave_only.MODE, plain.MODE, sliced.MODE)}


MODES: tuple[str, ...] = ("shadownet", "blinded", "enclave-only", "plain", "sliced")


def get(name: str) -> Mode:
    table = _table()
    if name not in table:
        raise TinyshieldError(f"unknown protection mode {name!r}: choose one of {', '.join(MODES)}")
    return table[name]

"""`tinyshield validate` and `tinyshield profile` on the emulated board, with a tiny .pt2 transformer:
per-op instruction counts add up exactly to the whole inference of the deployed (untapped) firmware,
a correct model validates op for op, and a kernel broken in the device image only (one requantisation
shift) is caught at its own op with a non-zero exit code."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tools.cli import main

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


class Tiny(nn.Module):
    """8 frames of 8 features: a linear embedding, one pre-LN encoder layer, mean pooling, a head."""

    def __init__(self, d=16):
        super().__init__()
        self.proj = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.1)
        self.layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.layer(self.proj(x) + self.pos)
        return self.head(F.silu(h).mean(1))


@pytest.fixture(scope="module")
def model(module_build, arm_toolchain):
    from mcu.build import build_model

    d = module_build
    torch.manual_seed(0)
    m = Tiny().eval()
    x = torch.rand(32, 8, 8)
    torch.export.save(torch.export.export(m, (x[:1],)), d / "tiny.pt2")
    np.save(d / "calib.npy", x.numpy())
    built = build_model(str(d / "tiny.pt2"), "stm32f405", calib_file=d / "calib.npy")
    yield d, built, x.numpy()


def test_per_op_instructions_add_up_to_the_untapped_inference(model):
    from mcu.device import open_board
    from mcu.opprofile import profile_ops

    d, built, xs = model
    p = profile_ops(built, xs[:2])
    # the untapped firmware, booted without per-call counting: the plain whole-inference count
    with open_board(built.firmware) as dev:
        plain = [dev.infer(built.quantise_input(x)).instructions for x in xs[:2]]
    assert p.first_total == plain[0]
    assert p.op_sum == p.total_instructions == round(np.mean(plain))
    assert p.entry_instructions + sum(p.calls) + p.exit_instructions == p.total_instructions
    assert len(p.calls) == len(built.schedule.calls) and all(c > 0 for c in p.calls)
    assert sum(o.macs for o in p.ops) == built.macs
    assert {o.op for o in p.ops} == {c.op for c in built.schedule.calls}
    # the costliest ops are the ones doing the work; every fc has a sane instructions/MAC
    fcs = [o for o in p.ops if o.kind == "fully_connected"]
    assert fcs and all(0.2 < o.instructions_per_mac < 50 for o in fcs)
    assert all(o.stack_bytes is not None and 0 < o.stack_bytes < 16384 for o in p.ops)
    assert all(0 < o.live_bytes <= built.plan.arena_bytes for o in p.ops)
    # the tap build (per-op stack) is reported separately: bigger flash, same inference count
    assert p.tap_flash > p.flash_used and p.tap_instructions == p.first_total


def test_profile_command_writes_png_and_json(model, tmp_path):
    d, built, xs = model
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["profile", str(d / "tiny.pt2"), "--calib", str(d / "calib.npy"), "--no-stack",
                 "--png", str(png), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["sums_exactly"] and r["op_sum"] == r["total_instructions"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_passes_a_correct_model(model, tmp_path):
    d, built, xs = model
    out = tmp_path / "v.json"
    assert main(["validate", str(d / "tiny.pt2"), "--calib", str(d / "calib.npy"), "--inputs", "2",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["passed"] and r["output_equal"] and r["first_divergent_op"] is None
    assert all(o["max_lsb"] == 0 for o in r["ops"])
    assert len(r["ops"]) >= 10
    # the float comparison sees most ops, and int8 stays close to float on them
    cos = [o["cosine"] for o in r["ops"] if o["cosine"] is not None]
    assert len(cos) >= len(r["ops"]) // 2 and min(cos) > 0.98


def _break_one_shift(schedule, which: int = 1):
    """A copy of `schedule` whose `which`-th fully connected call requantises with every shift one step
    off (a new constant; the host's graph and schedule are untouched). -> (schedule, op name)."""
    from mcu.graph import Const
    from mcu.kernels import KERNELS

    g = copy.copy(schedule.graph)
    g.tensors = dict(g.tensors)
    fcs = [i for i, c in enumerate(schedule.calls) if c.kernel in ("fc_s8", "fc_s8w16")]   # int8 or int16 weights
    i = fcs[which]
    c = schedule.calls[i]
    k = [n for n, _ in KERNELS[c.kernel].params].index("shift")
    t = g.tensors[c.args[k].tensor]
    g.tensors[t.name + ".broken"] = dataclasses.replace(t, name=t.name + ".broken", data=t.data + 1)
    args = list(c.args)
    args[k] = Const(t.name + ".broken", c.args[k].offset)
    calls = list(schedule.calls)
    calls[i] = dataclasses.replace(c, args=tuple(args))
    return dataclasses.replace(schedule, graph=g, calls=calls), c.op


def test_validate_names_the_op_of_a_broken_kernel(model, tmp_path, monkeypatch):
    import mcu.build

    d, built, xs = model
    broken, op = _break_one_shift(built.schedule)
    real = mcu.build.firmware_variant

    def broken_device_build(b, taps=False, schedule=None, force=False):
        return real(b, taps=taps, schedule=_break_one_shift(b.schedule)[0], force=force)

    # only the device image is built from the broken schedule; the host reference keeps the real one
    monkeypatch.setattr(mcu.build, "firmware_variant", broken_device_build)
    out = tmp_path / "v.json"
    assert main(["validate", str(d / "tiny.pt2"), "--calib", str(d / "calib.npy"), "--inputs", "2",
                 "--json", str(out)]) == 1
    r = json.loads(out.read_text())
    assert not r["passed"] and r["first_divergent_op"] == op
    first = r["first_divergent"]
    assert r["ops"][first]["max_lsb"] > 0
    assert all(o["max_lsb"] == 0 for o in r["ops"][:first])      # everything before it still agrees

"""A user's own model as a .pt2 through the command line and `tinyshield.deploy`: plan, build, eval with
.npy/.npz data, run — on the emulated board, bit-identical to the host int8 reference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tools.cli import main

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


class DigitsTransformer(nn.Module):
    """sklearn's 8x8 digits as 8 frames of 8 features: a pre-LN encoder layer, mean pooling, a head."""

    def __init__(self, d=32):
        super().__init__()
        self.proj = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.1)
        self.layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.layer(self.proj(x) + self.pos)
        return self.head(F.silu(h).mean(1))


@pytest.fixture(scope="module")
def files(module_build, arm_toolchain):
    from sklearn.datasets import load_digits

    d = module_build
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target
    torch.manual_seed(0)
    m = DigitsTransformer().eval()
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    m.train()
    for step in range(150):                       # a few seconds: enough to be far above chance
        i = torch.randint(0, 1400, (64,))
        loss = F.cross_entropy(m(torch.from_numpy(x[i])), torch.from_numpy(y[i]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    ep = torch.export.export(m, (torch.from_numpy(x[:1]),))
    torch.export.save(ep, d / "digits.pt2")
    np.save(d / "calib.npy", x[:64])
    np.savez(d / "test.npz", x=x[1500:1540], y=y[1500:1540])
    np.save(d / "one.npy", x[1500])
    yield d, m, x, y


def test_plan_build_eval_run_a_pt2(files, capsys, tmp_path):
    d, m, x, y = files
    pt2 = str(d / "digits.pt2")
    assert main(["plan", pt2, "--calib", str(d / "calib.npy"), "--schedule", "layerwise"]) == 0
    assert "arena" in capsys.readouterr().out
    assert main(["build", pt2, "--calib", str(d / "calib.npy")]) == 0
    assert "firmware" in capsys.readouterr().out
    out = tmp_path / "eval.json"
    assert main(["eval", pt2, "--calib", str(d / "calib.npy"), "--data", str(d / "test.npz"),
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["agreement"] == 1.0 and r["n"] == 40
    with torch.no_grad():
        want = float((m(torch.from_numpy(x[1500:1540])).argmax(1).numpy() == y[1500:1540]).mean())
    assert r["float_accuracy"] == pytest.approx(want)
    assert r["int8_float_agreement"] >= 0.9 and r["accuracy"] > 0.5
    capsys.readouterr()
    assert main(["run", "--board", "stm32f405", pt2, str(d / "one.npy"), "--calib", str(d / "calib.npy")]) == 0
    assert "host int8 reference identical" in capsys.readouterr().out


def test_pt2_without_data_is_refused_in_one_line(files, capsys):
    d, *_ = files
    assert main(["eval", str(d / "digits.pt2"), "--calib", str(d / "calib.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--data test.npz" in err and "\n" not in err


def test_deploy_from_python(files):
    import tinyshield

    d, m, x, y = files
    with tinyshield.deploy(m, torch.from_numpy(x[:1]), calib=x[:64]) as dep:
        out = dep.run(x[1501])
        assert out.shape == (1, 10) and dep.last.instructions > 0
        with torch.no_grad():
            f = m(torch.from_numpy(x[1501:1502])).numpy()
        assert np.abs(out - f).max() < 0.25 * max(1.0, np.abs(f).max())

"""The captured-graph front end (edge.capture -> mcu.from_aten) on models built from stock torch modules.

For each supported operator: the captured graph computes what the module computes (within 1e-5), and
the int8 graph it lowers to (the host reference) stays close to the float model. Unsupported patterns
are refused naming the op, the module path and the user's source line, with nothing written; broken
.pt2 files give a one-line error. End to end: each example architecture (examples/) on the emulated
board, bit-identical to the host int8 reference."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge.capture import calibrate, capture, load
from base.errors import TinyshieldError
from mcu.build import quantise_input
from mcu.execute import reference
from mcu.from_aten import lower_captured

HERE = Path(__file__).resolve()


def _ids(rng, n, L, vocab=50):
    """Token ids with trailing padding (id 0), at least two real tokens per row."""
    x = rng.integers(1, vocab, (n, L))
    for r in range(n):
        x[r, rng.integers(2, L + 1):] = 0
    return x


def _check(model, xs, tol=0.08):
    """capture -> the captured graph equals the module (1e-5); lower -> the int8 reference is within
    `tol` x (the float output's range over the inputs) of the float model on every input."""
    torch.manual_seed(0)
    model = model.eval()
    cap = capture(model, (torch.as_tensor(xs[:1]),))
    with torch.no_grad():
        for x in xs[:3]:
            want = model(torch.as_tensor(x[None]))
            got = cap.run(torch.as_tensor(x[None]))[0]
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
        floats = np.stack([model(torch.as_tensor(x[None])).numpy().reshape(-1) for x in xs])
    g = lower_captured(cap, calibrate(cap, [x[None] for x in xs]), "t")
    scale, zp = g.meta["output_q"]
    ints = np.stack([reference(g, {"input": quantise_input(g, x)})["output"].reshape(-1) for x in xs])
    deq = (ints.astype(np.float64) - zp) * scale
    span = float(floats.max() - floats.min())
    err = float(np.abs(deq - floats).max())
    assert span > 0 and err <= tol * span, f"int8 error {err:.4f} vs float range {span:.4f}"
    return g


def _kernels(g) -> list[str]:
    return [op.kind for op in g.ops]


# ---------------------------------------------------------------- one model per supported op

class Linear(nn.Module):               # linear + bias + ReLU (fused), flatten
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Conv(nn.Module):                 # conv2d (HWC on the board) + ReLU, flatten(2).transpose(1, 2), mean over tokens
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.c2(F.relu(self.c1(x)))
        return self.head(h.flatten(2).transpose(1, 2).mean(1))


class Pointwise(nn.Module):            # one 256-entry table per function
    def __init__(self, fn):
        super().__init__()
        self.fn, self.fc1, self.fc2 = fn, nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.fn(self.fc1(x)))


class Arith(nn.Module):                # add / mul of activations (with row broadcast), add/sub/mul/div by constants
    def __init__(self):
        super().__init__()
        self.a, self.b, self.g = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.randn(8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):              # x (1, 6, 8)
        h = self.a(x) + self.b(x)                    # add_s8
        h = h * torch.sigmoid(self.g(x))             # mul_s8 of two activations (a gate)
        h = (h - self.bias) * 0.5 / 2.0              # constants
        gate = torch.sigmoid(self.g(x).mean(1, keepdim=True))    # (1, 1, 8): broadcast over the rows
        return self.out(h * gate)


class Signs(nn.Module):              # subtracting activations, negation, a negative scale
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        h = self.a(x) - self.b(x)
        h = self.ln(-h + self.a(x) * -0.5)
        return self.out(h - torch.tanh(h))


class ConvBN(nn.Module):               # conv2d -> BatchNorm2d (eval) -> ReLU: BatchNorm folded into the conv
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.Linear(8 * 4 * 4, 4)
        with torch.no_grad():
            self.bn.running_mean.normal_(0, 0.3)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_(1, 0.3)
            self.bn.bias.normal_(0, 0.3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class Norm(nn.Module):                 # LayerNorm alone, after a residual add, and after a constant add
    def __init__(self):
        super().__init__()
        self.ln0, self.ln1, self.ln2 = nn.LayerNorm(8), nn.LayerNorm(8), nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.pos = nn.Parameter(torch.randn(1, 6, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.ln0(x)
        h = self.ln1(h + self.fc(h))
        return self.out(self.ln2(h + self.pos))


class Views(nn.Module):                # reshape/view/permute/transpose/select/slice/cat of activations
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6 * 3, 3)

    def forward(self, x):              # (1, 1, 8, 8) image
        p = x.reshape(1, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(1, 4, 16)      # 2x2 patches of 4x4
        h = self.fc(p.reshape(1, 16, 4))                     # (1, 16, 6)
        h = torch.cat([h[:, :1], h[:, -2:]], dim=1)          # slice, cat of activations
        h = h.transpose(1, 2).contiguous().transpose(1, 2)
        return self.out(h.reshape(1, -1)) + h[:, 1, 0:3]           # add of two activations (add_s8)


class SDPA(nn.Module):                 # scaled_dot_product_attention, heads by view/transpose, CLS + select
    def __init__(self, d=16, heads=2, mask=False):
        super().__init__()
        self.h, self.mask = heads, mask
        self.emb = nn.Embedding(50, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.qkv, self.o, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, ids):
        x = torch.cat([self.cls, self.emb(ids)], 1)
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        m = None
        if self.mask:                  # boolean attn_mask: True = may attend (CLS always valid)
            m = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), ids != 0], 1)[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return self.head(self.o(a.transpose(1, 2).reshape(B, L, d))[:, 0])


class MHA(nn.Module):                  # nn.MultiheadAttention (packed in_proj), key_padding_mask, masked mean
    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        pad = ids == 0
        x = self.emb(ids)
        a, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        m = (~pad).unsqueeze(-1).float()
        return self.head((a * m).sum(1) / m.sum(1).clamp(min=1.0))


class EncoderLayer(nn.Module):         # nn.TransformerEncoderLayer, post- or pre-LN, float key mask
    def __init__(self, norm_first, activation):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, 0.0, activation=activation, batch_first=True,
                                                norm_first=norm_first)
        self.head = nn.Linear(16, 2)

    def forward(self, ids):
        bias = (ids == 0).float() * -1e9
        return self.head(self.layer(self.emb(ids), src_key_padding_mask=bias).mean(1))


def test_linear_relu_flatten():
    g = _check(Linear(), np.random.default_rng(0).normal(size=(16, 1, 4, 4)).astype(np.float32))
    assert _kernels(g).count("fully_connected") == 2 and "lut" not in _kernels(g)     # ReLU fused


def test_conv2d_and_token_mean():
    x = np.random.default_rng(1).random((16, 1, 8, 8)).astype(np.float32)
    g = _check(Conv(), x)
    assert g.meta["input_layout"] == "nchw->hwc" and "mean_pool" in _kernels(g)


@pytest.mark.parametrize("fn", [F.gelu, lambda t: F.gelu(t, approximate="tanh"), F.relu, F.silu, torch.sigmoid,
                                torch.tanh, F.hardswish, nn.ELU(), nn.LeakyReLU(0.1)],
                         ids=["gelu", "gelu_tanh", "relu", "silu", "sigmoid", "tanh", "hardswish", "elu", "leaky_relu"])
def test_pointwise_functions(fn):
    _check(Pointwise(fn), np.random.default_rng(2).normal(size=(32, 1, 8)).astype(np.float32) * 2)


def test_add_mul_broadcast_and_constants():
    g = _check(Arith(), np.random.default_rng(3).normal(size=(16, 6, 8)).astype(np.float32), tol=0.1)
    assert {"add", "mul"} <= set(_kernels(g))


def test_subtraction_and_negation():
    g = _check(Signs(), np.random.default_rng(10).normal(size=(16, 6, 8)).astype(np.float32))
    assert "lut" in _kernels(g) and "add_layernorm" in _kernels(g)


def test_batchnorm_after_conv_is_folded():
    g = _check(ConvBN(), np.random.default_rng(11).random((16, 1, 8, 8)).astype(np.float32))
    assert [k for k in _kernels(g) if k != "permute"] == ["conv2d", "fully_connected"]     # no BatchNorm, no ReLU op


def test_layernorm_alone_residual_and_constant():
    g = _check(Norm(), np.random.default_rng(4).normal(size=(16, 6, 8)).astype(np.float32))
    assert _kernels(g).count("add_layernorm") == 3


def test_views_slices_and_cat():
    _check(Views(), np.random.default_rng(5).random((16, 1, 8, 8)).astype(np.float32))


@pytest.mark.parametrize("mask", [False, True], ids=["plain", "bool_mask"])
def test_sdpa_with_cls_token(mask):
    g = _check(SDPA(mask=mask), _ids(np.random.default_rng(6), 24, 7))
    assert {"matmul_qk", "softmax", "matmul_pv", "concat"} <= set(_kernels(g))
    assert ("pad_mask" in _kernels(g)) == mask


def test_multihead_attention_key_padding_and_masked_mean():
    g = _check(MHA(), _ids(np.random.default_rng(7), 24, 8))
    assert {"pad_mask", "matmul_qk", "mean_pool"} <= set(_kernels(g))


@pytest.mark.parametrize("norm_first,act", [(False, "relu"), (True, "gelu")])
def test_transformer_encoder_layer(norm_first, act):
    g = _check(EncoderLayer(norm_first, act), _ids(np.random.default_rng(8), 24, 8), tol=0.1)
    assert {"pad_mask", "matmul_qk", "add_layernorm"} <= set(_kernels(g))


def test_padding_is_masked_out():
    """With the key mask and masked mean pooling, a padded sentence means what its real tokens mean:
    the int8 graph's answer on 3 tokens + 5 pads is the float model's on the 3 tokens alone."""
    torch.manual_seed(0)
    model = MHA().eval()
    xs = _ids(np.random.default_rng(9), 24, 8)
    g = _check(model, xs)
    scale, zp = g.meta["output_q"]
    for x in xs[:4]:
        x = x.copy()
        x[3:] = 0
        got = (reference(g, {"input": quantise_input(g, x)})["output"].reshape(-1).astype(np.float64) - zp) * scale
        with torch.no_grad():
            short = model(torch.as_tensor(x[None, :3])).numpy().reshape(-1)
            unmasked = model.head(model.attn(*(model.emb(torch.as_tensor(x[None])),) * 3)[0].mean(1)).numpy()
        err, ignored = np.abs(got - short).max(), np.abs(unmasked.reshape(-1) - short).max()
        assert err <= 8 * scale and ignored > 3 * err          # the mask matters, and int8 honours it


# ---------------------------------------------------------------- refusals

class Sorts(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8))

    def forward(self, x):
        h = self.inner(x)
        return torch.sort(h, dim=-1).values      # the refused line


class Causal(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.proj(x).view(1, 6, 3, 1, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).flatten(1)   # the refused line


def _line_of(cls, text: str) -> int:
    import inspect
    lines, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.parametrize("cls,op,text", [(Sorts, "sort", "torch.sort"), (Causal, "add", "is_causal=True")])
def test_unsupported_ops_are_refused_with_module_and_line(cls, op, text, build_tmp, tmp_path):
    from mcu.build import build_model

    torch.manual_seed(0)
    x = torch.randn(1, 6, 8)
    ep = torch.export.export(cls().eval(), (x,))
    torch.export.save(ep, tmp_path / "m.pt2")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(4, 1, 6, 8)).astype(np.float32)[:, 0])
    with pytest.raises(TinyshieldError) as e:
        build_model(str(tmp_path / "m.pt2"), "stm32f405", calib_file=tmp_path / "calib.npy", calib=4)
    msg = str(e.value)
    assert f"aten.{op}" in msg and f"{HERE}:{_line_of(cls, text)}" in msg and text in msg
    if cls is Sorts:
        assert "not supported" in msg and "module <top>" in msg
    else:
        assert "causal" in msg and "module <top>" in msg
    written = [p for p in build_tmp.rglob("*") if p.is_file()]
    assert written == [], written           # no graph, no C, no firmware


def test_refusal_names_the_submodule():
    class Inner(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, -1)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.block = nn.Linear(8, 8), nn.Sequential(nn.Identity(), Inner())

        def forward(self, x):
            return self.block(self.fc(x))

    x = np.random.default_rng(0).normal(size=(4, 1, 8)).astype(np.float32)
    cap = capture(Outer(), (torch.as_tensor(x[:1]),))
    with pytest.raises(TinyshieldError, match=r"aten\.cumsum.*module block\.1.*test_capture\.py:\d+ \(return torch\.cumsum"):
        lower_captured(cap, calibrate(cap, [v[None] for v in x]))


# ---------------------------------------------------------------- broken .pt2 files

@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory):
    p = tmp_path_factory.mktemp("pt2") / "linear.pt2"
    torch.export.save(torch.export.export(Linear().eval(), (torch.randn(1, 1, 4, 4),)), p)
    return p


def test_a_saved_program_loads_and_runs(good_pt2):
    cap = load(good_pt2)
    x = torch.randn(1, 1, 4, 4)
    assert cap.run(x)[0].shape == (1, 5)


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "garbage", "empty"])
def test_broken_pt2_gives_one_line_error(good_pt2, tmp_path, damage):
    data = good_pt2.read_bytes()
    bad = tmp_path / f"{damage}.pt2"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":                 # a valid zip container whose members are garbage
        import zipfile
        with zipfile.ZipFile(good_pt2) as src, zipfile.ZipFile(bad, "w") as dst:
            for info in src.infolist():
                blob = src.read(info)
                dst.writestr(info, bytes(b ^ 0x5A for b in blob) if len(blob) > 16 else blob)
    elif damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    else:
        bad.write_bytes(b"")
    with pytest.raises(TinyshieldError) as e:
        load(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and len(msg) < 400


# ---------------------------------------------------------------- the example architectures on the board

def _examples():
    from examples.encoder_cls_sst2 import EncoderCLS
    from examples.kws_mnist_rows import KWS
    from examples.mha_agnews import MHAClassifier
    from examples.vit_sdpa_mnist import PatchViT
    return {
        "encoder_cls": (lambda: EncoderCLS(vocab=300, seq_len=16, d=32, heads=2, ff=64, layers=1), "text16"),
        "vit_sdpa": (lambda: PatchViT(patch=7, d=32, heads=2, ff=64, layers=1), "mnist"),
        "mha": (lambda: MHAClassifier(vocab=300, seq_len=16, d=32, heads=2, ff=64), "text16"),
        "kws": (lambda: KWS(d=32, heads=2, ff=64, layers=1), "rows"),
    }


def _real_inputs(kind: str, n: int) -> np.ndarray:
    from examples.common import mnist_data, text_data
    if kind == "text16":
        x, _, xt, _ = text_data("sst2", 300, 16, n)
        return np.concatenate([x[:n], xt[:n]])
    x, _, xt, _ = mnist_data(n)
    x = np.concatenate([x[:n], xt[:n]])
    return x if kind == "mnist" else x[:, 0]


@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.parametrize("name", ["encoder_cls", "vit_sdpa", "mha", "kws"])
def test_example_architecture_on_the_board(name, arm_toolchain, shared_data, build_tmp, tmp_path):
    """Random weights (training is the examples' job), real calibration data; the .pt2 goes through
    `build_model` like a user's, and the board's outputs equal the host int8 reference bit for bit."""
    from examples.common import export
    from mcu.build import build_model
    from mcu.device import open_board

    torch.manual_seed(0)
    make, kind = _examples()[name]
    model = make().eval()
    xs = _real_inputs(kind, 24)
    calib, test = xs[:24], xs[[0, 1, 24, 25]]     # two inside the calibration set: no clipping there
    export(model, calib, test, np.zeros(len(test), dtype=np.int64), tmp_path)
    built = build_model(str(tmp_path / "model.pt2"), "stm32f405", calib_file=tmp_path / "calib.npy", calib=24)
    assert built.firmware.flash_used <= built.firmware.flash_bytes
    with open_board(built.firmware) as dev:
        for x in test:
            q = built.quantise_input(x)
            r = dev.infer(q)
            ref = built.reference(q).reshape(-1)
            assert np.array_equal(r.output.reshape(-1), ref)
            assert r.instructions and r.instructions > built.macs // 4
        for x in test[:2]:      # and where calibration saw the input, the int8 answer is the float model's
            ref = built.reference(built.quantise_input(x)).reshape(-1)
            scale, zp = built.graph.meta["output_q"]
            with torch.no_grad():
                f = model(torch.as_tensor(x[None])).numpy().reshape(-1)
            assert np.abs((ref.astype(np.float64) - zp) * scale - f).max() <= 0.1 * 255 * scale   # 10% of the range

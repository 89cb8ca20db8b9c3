"""The whole deployment path on the emulated boards, with the project's own code generator:
a small random-initialised ViT -> int8 graph -> schedule -> arena plan -> C -> firmware -> QEMU,
and the device's logits against the host int8 reference, bit for bit."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from edge.data import data_dir, mnist
from edge.models.io import save_model
from edge.models.vit import ViT, ViTConfig
from mcu.build import build_model
from mcu.device import evaluate, open_board

pytestmark = [pytest.mark.qemu]


@pytest.fixture(scope="module")
def env(tmp_path_factory, arm_toolchain):
    """A session build cache and a small ViT (random weights, real MNIST calibration)."""
    root = tmp_path_factory.mktemp("device")
    old = os.environ.get("TINYSHIELD_BUILD")
    os.environ["TINYSHIELD_BUILD"] = str(root / "build")
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, stem_channels=8)
    model_dir = save_model(ViT(cfg).eval(), root / "vit-small", {"kind": "vit", "model": cfg.to_dict()})
    ds = mnist(allow_fallback=data_dir(required=False) is None)
    yield model_dir, ds
    if old is None:
        os.environ.pop("TINYSHIELD_BUILD", None)
    else:
        os.environ["TINYSHIELD_BUILD"] = old


@pytest.fixture(scope="module")
def built(env):
    model_dir, _ = env
    return build_model(str(model_dir), "stm32f405", calib=64)


@pytest.mark.slow
def test_one_inference_equals_the_reference(env, built):
    _, ds = env
    with open_board(built.firmware) as dev:
        info = dev.info
        assert info.input_shape == built.graph.tensors["input"].shape
        assert info.arena_bytes == built.plan.arena_bytes and info.macs == built.macs
        q = built.quantise_input(ds.x_test[0])
        r = dev.infer(q)
        assert np.array_equal(r.output.reshape(-1), built.reference(q).reshape(-1))
        again = dev.infer(q)
        assert again.instructions == r.instructions > built.macs // 4       # exact and repeatable
        assert r.peak_sram == built.plan.arena_bytes + r.stack_bytes and 0 < r.stack_bytes < 8192


@pytest.mark.slow
def test_evaluation_on_another_board(env):
    model_dir, ds = env
    b = build_model(str(model_dir), "mps3-an547", calib=64)
    with open_board(b.firmware) as dev:
        ev = evaluate(dev, b, ds.x_test[:8], ds.y_test[:8])
    assert ev.agreement == 1.0 and not ev.mismatches
    assert ev.mean_instructions > 0 and ev.instructions_per_mac > 0
    assert ev.peak_sram == b.plan.arena_bytes + ev.stack_max

"""512 tokens on the 192 KB STM32F405: BERT-tiny fits only when attention recomputes K/V per query
block; on the emulated board its logits equal the host reference and the layerwise schedule's, bit
for bit. The firmware is cached under the build directory (keyed by weights, board, options, code)."""
from __future__ import annotations

import numpy as np
import pytest

from mcu import execute
from mcu.build import build_model
from mcu.device import open_board
from mcu.schedules import layerwise

pytestmark = [pytest.mark.qemu]

L, D = 512, 128


@pytest.mark.slow
def test_bert_tiny_512_tokens_on_stm32f405(arm_toolchain):
    from tools.bench.device import bert_tiny_clr
    spec, _ = bert_tiny_clr(L)               # BERT-tiny shapes, random weights, rank-8 CLR word table
    b = build_model(spec, "stm32f405", schedule="tiled", calib=4, seq_len=L)
    assert b.schedule.params["recompute"] == [0, 1]          # keeping K/V (3 L d) does not fit 192 KB
    assert 2 * L * D < b.plan.arena_bytes < 3 * L * D
    ids = np.random.default_rng(0).integers(1000, 30000, L).astype(np.int32)
    ids[0] = 101
    q = b.quantise_input(ids)
    want = execute.run(layerwise(b.graph), {b.graph.inputs[0]: q})[b.graph.outputs[0]]
    with open_board(b.firmware) as dev:
        r = dev.infer(q)
    assert np.array_equal(r.output.reshape(-1), b.reference(q).reshape(-1))
    assert np.array_equal(r.output.reshape(-1), want.reshape(-1))
    assert r.peak_sram == b.plan.arena_bytes + r.stack_bytes <= 192 * 1024

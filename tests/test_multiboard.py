"""Several emulated boards at once in one process (mcu/multiboard.py): the result is one board's, exactly.

The shipped ViT (the demo's model) on real QEMU boards; 12 images, so it stays under a minute."""
from __future__ import annotations

import numpy as np
import pytest

from base.data import data_dir, mnist
from base.errors import TinyshieldError
from mcu.device import InputRecord, chunk_ranges, evaluate, merge, open_board
from mcu.multiboard import evaluate_on_boards

N = 12


def test_chunks_cover_every_input_once_in_order():
    for n, boards, size in [(1, 4, None), (12, 2, None), (12, 2, 5), (1000, 2, None), (7, 3, 3)]:
        chunks = chunk_ranges(n, boards, size)
        assert [c for c, _, _ in chunks] == list(range(len(chunks)))
        assert [i for _, s, e in chunks for i in range(s, e)] == list(range(n))


def test_a_competing_process_takes_a_core_from_the_board_count():
    """The demo's board count (and torch's threads) leave out cores somebody else is using right now."""
    import multiprocessing as mp
    import os

    from edge.recipes import available_cores, busy_cores, pick_threads

    assert 0 <= busy_cores() <= (os.cpu_count() or 1) + 1e-9
    assert pick_threads(3) == 3 and 1 <= pick_threads() <= available_cores()
    spin = mp.get_context("spawn").Process(target=_spin, daemon=True)
    spin.start()
    try:
        import time
        time.sleep(0.5)                            # the child is up and spinning
        assert busy_cores() >= 0.8                 # its core counts as busy, whatever else runs
        if available_cores() > 1:
            assert pick_threads() <= available_cores() - 1
    finally:
        spin.terminate()
        spin.join()


def _spin():
    while True:
        pass


def test_merge_refuses_a_lost_or_doubled_input():
    class Info:                                    # what summarise reads of a board's ModelInfo
        board, name, macs, arena_bytes, static_ram = "stm32f405", "m", 10, 100, 200

    rec = [InputRecord(i, np.array([0, i], np.int8), 50, 8, True) for i in range(3)]
    ev = merge(Info, reversed(rec), 3, [0, 1, 0], 1.0)
    assert ev.predictions == [0, 1, 1] and ev.accuracy == 2 / 3 and ev.instructions == [50, 50, 50]
    with pytest.raises(TinyshieldError, match="missing"):
        merge(Info, rec[:2], 3, [0, 1, 0], 1.0)
    with pytest.raises(TinyshieldError, match="exactly once"):
        merge(Info, rec + rec[:1], 3, [0, 1, 0], 1.0)


@pytest.mark.qemu
@pytest.mark.slow
def test_two_boards_give_the_one_board_result(module_build, arm_toolchain, one_thread):
    from edge.recipes.vit_mnist import train
    from mcu.build import build_model

    shared = data_dir(required=False) is not None
    r = train(fallback_data=not shared, any_shipped=True)
    built = build_model(str(r.path), "stm32f405", calib=32)
    ds = mnist(allow_fallback=not shared)
    xs, ys = ds.x_test[:N], ds.y_test[:N]
    with open_board(built.firmware) as dev:
        one = evaluate(dev, built, xs, ys)
    two = evaluate_on_boards(built, xs, ys, boards=2, chunk_size=2)
    assert one.n == two.n == N and one.agreement == 1.0
    assert two.predictions == one.predictions
    assert two.instructions == one.instructions and len(two.instructions) == N
    assert (two.accuracy, two.agreement, two.mismatches, two.mean_instructions, two.stack_max, two.peak_sram) == \
           (one.accuracy, one.agreement, one.mismatches, one.mean_instructions, one.stack_max, one.peak_sram)

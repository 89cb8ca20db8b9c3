"""Firmware on the emulated boards: real arm-none-eabi-gcc, real QEMU, the real serial protocol."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from edge.errors import TinyshieldError
from mcu.boards import BOARDS
from mcu.build import build_firmware
from mcu.device import open_board
from mcu.emulator import Emulator
from mcu.link import Link
import board_models

pytestmark = [pytest.mark.qemu]


@pytest.fixture(scope="session")
def fw_build(tmp_path_factory, arm_toolchain):
    """One firmware cache for the whole session (keyed by the hash of every input)."""
    d = tmp_path_factory.mktemp("fwbuild")
    old = os.environ.get("TINYSHIELD_BUILD")
    os.environ["TINYSHIELD_BUILD"] = str(d)
    yield d
    if old is None:
        os.environ.pop("TINYSHIELD_BUILD", None)
    else:
        os.environ["TINYSHIELD_BUILD"] = old


def _gone(pid: int) -> bool:
    """True when the process no longer exists (not even as a zombie)."""
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("board", list(BOARDS))
def test_boot_and_info_round_trip(board, fw_build, tmp_path):
    fw = build_firmware(board_models.nops(tmp_path / "m", 10), board, kernels=False)
    assert 0 < fw.flash_used <= fw.flash_bytes and 0 < fw.ram_used <= fw.ram_bytes
    with open_board(fw) as dev:
        info = dev.info
        assert (info.name, info.board, info.protocol) == ("nops-10", board, 1)
        assert info.input_shape == (16,) and info.output_bytes == 16 and info.input_dtype == "int8"
        # the stack is all RAM above .data/.bss
        assert info.static_ram + info.stack_bytes == BOARDS[board].ram_bytes
        assert dev.link.echo(b"hello board") == b"hello board"
        x = np.arange(-8, 8, dtype=np.int8)
        r = dev.infer(x)
        assert np.array_equal(r.output, x)
        assert r.instructions > 10 and r.stack_bytes > 0


def test_instruction_count_is_exact_and_repeatable(fw_build, tmp_path):
    counts = {}
    for n in (100, 350):
        fw = build_firmware(board_models.nops(tmp_path / f"n{n}", n), "stm32f405", kernels=False)
        with open_board(fw) as dev:
            runs = [dev.infer(np.zeros(16, np.int8)).instructions for _ in range(3)]
        assert len(set(runs)) == 1, runs
        counts[n] = runs[0]
    assert counts[350] - counts[100] == 250


def test_model_over_budget_is_refused_naming_the_overflow(fw_build, tmp_path):
    with pytest.raises(TinyshieldError, match=r"FLASH overflowed by [\d,]+ bytes") as e:
        build_firmware(board_models.oversized(tmp_path / "f", weight_bytes=1100 * 1024), "stm32f405", kernels=False)
    assert "stm32f405" in str(e.value)
    # 200 KB of arena cannot sit in 192 KB of RAM; the same model fits the 320 KB budget of mps2-an386
    big_arena = board_models.oversized(tmp_path / "r", arena_bytes=200 * 1024)
    with pytest.raises(TinyshieldError, match=r"RAM overflowed by [\d,]+ bytes"):
        build_firmware(big_arena, "stm32f405", kernels=False)
    assert build_firmware(big_arena, "mps2-an386", kernels=False).ram_used > 200 * 1024


def _garbage(rng: np.random.Generator, k: int) -> bytes:
    """One malformed frame of a few kinds: noise, bit flips, truncation, bad lengths, unknown commands."""
    from mcu.link import MAX_PAYLOAD, SYNC, frame
    kind = k % 7
    good = frame(int(rng.choice([1, 2, 4, 5, 7])), int(rng.integers(256)), rng.bytes(int(rng.integers(0, 40))))
    if kind == 0:
        return rng.bytes(int(rng.integers(1, 64)))
    if kind == 1:                                    # flip a bit somewhere after the sync bytes
        b = bytearray(good)
        i = int(rng.integers(2, len(b)))
        b[i] ^= 1 << int(rng.integers(8))
        return bytes(b)
    if kind == 2:                                    # cut short, then the next frame arrives
        return good[:int(rng.integers(1, len(good)))]
    if kind == 3:                                    # a length beyond the limit
        return SYNC + bytes([1, 0]) + int(rng.integers(MAX_PAYLOAD + 1, 65536)).to_bytes(2, "little")
    if kind == 4:                                    # valid frame, unknown command
        return frame(int(rng.integers(0x08, 0x7F)), int(rng.integers(256)), rng.bytes(4))
    if kind == 5:                                    # valid frame, bad arguments
        return frame(int(rng.choice([2, 3, 4, 6])), int(rng.integers(256)), rng.bytes(int(rng.integers(1, 3))))
    return SYNC * int(rng.integers(1, 4)) + rng.bytes(int(rng.integers(0, 8)))


@pytest.mark.slow
def test_firmware_survives_fuzzing(fw_build, tmp_path):
    fw = build_firmware(board_models.nops(tmp_path / "m", 10), "stm32f405", kernels=False)
    rng = np.random.default_rng(0)
    with open_board(fw) as dev:
        x = rng.integers(-128, 128, 16).astype(np.int8)
        before = dev.infer(x)
        sent = 0
        for batch in range(100):
            dev.link.send_raw(b"".join(_garbage(rng, k) for k in range(sent, sent + 20)))
            sent += 20
            dev.link.drain(quiet=0.01)               # read the error replies so the UART never blocks
        assert sent >= 2000
        dev.link.send_raw(bytes(1100))               # finish whatever partial frame the noise left open
        dev.link.drain(quiet=0.3)
        after = dev.infer(x)
        assert np.array_equal(after.output, x) and after.instructions == before.instructions
        st = dev.link.stats()
        assert st.frames_crc + st.frames_malformed > 500
        assert dev.link.info().name == "nops-10"


@pytest.mark.slow
def test_board_killed_mid_inference_gives_clear_error_and_no_zombie(fw_build, tmp_path):
    fw = build_firmware(board_models.busy(tmp_path / "m", 2_000_000_000), "stm32f405", kernels=False)
    emu = Emulator(fw).start()
    pid = emu.pid
    with emu, Link(emu.url, timeout=1.0, retries=1) as link:
        link.upload(bytes(16))
        threading.Timer(0.5, emu.kill).start()
        t0 = time.monotonic()
        with pytest.raises(TinyshieldError, match="connection to the board .* lost"):
            link.run(timeout=30)
        assert time.monotonic() - t0 < 10
    assert _gone(pid)


@pytest.mark.slow
def test_hung_board_times_out_with_clear_error(fw_build, tmp_path):
    fw = build_firmware(board_models.busy(tmp_path / "m", 2_000_000_000), "stm32f405", kernels=False)
    with Emulator(fw) as emu, Link(emu.url, timeout=0.3, retries=1) as link:
        pid = emu.pid
        link.upload(bytes(16))
        with pytest.raises(TinyshieldError, match=r"did not answer RUN after 2 tries \(no reply within 0.5 s\)"):
            link.run(timeout=0.5)
    assert _gone(pid)


def test_two_boards_at_once(fw_build, tmp_path):
    fws = [build_firmware(board_models.nops(tmp_path / "a", 20), "stm32f405", kernels=False),
           build_firmware(board_models.nops(tmp_path / "b", 40), "mps2-an386", kernels=False)]
    results, errors = {}, []

    def work(fw):
        try:
            with open_board(fw) as dev:
                xs = [np.full(16, i, np.int8) for i in range(5)]
                results[fw.board] = (dev.emulator.port, [np.array_equal(dev.infer(x).output, x) for x in xs])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(fw,)) for fw in fws]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results["stm32f405"][0] != results["mps2-an386"][0]
    assert all(results["stm32f405"][1]) and all(results["mps2-an386"][1])

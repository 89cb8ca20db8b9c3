"""Firmware on the emulated boards: real arm-none-eabi-gcc, real QEMU, the real serial protocol."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from base.errors import TinyshieldError
from mcu.boards import BOARDS
from mcu.compile import build_firmware
from mcu.device import open_board
from mcu.emulator import Emulator
from mcu.link import Link

pytestmark = [pytest.mark.qemu]


# Small hand-written model.c/model.h pairs following the generated-model contract (tsh_model_info,
# tsh_arena, tsh_model_run), for firmware tests that need a model with a given shape of cost: a
# long busy loop, an exact number of instructions, an oversized weight table or arena.
HEADER = """#include <stdint.h>
typedef struct {
  const char *name; uint8_t input_dtype, output_dtype, input_rank, output_rank;
  uint16_t input_shape[4], output_shape[4];
  float input_scale; int32_t input_zero_point; float output_scale; int32_t output_zero_point;
  uint32_t input_bytes, output_bytes, arena_bytes, macs;
} tsh_model_info_t;
extern const tsh_model_info_t tsh_model_info;
extern int8_t tsh_arena[];
void tsh_model_run(const void *input, void *output);
#define TSH_MODEL_INPUT_BYTES 16
#define TSH_MODEL_OUTPUT_BYTES 16
"""


def write_model(d: Path, name: str, body: str, arena_bytes: int = 16, extra: str = "") -> Path:
    """model.c copying its 16-byte input to its output after running `body`."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.h").write_text(HEADER)
    (d / "model.c").write_text(f"""#include "model.h"
const tsh_model_info_t tsh_model_info = {{"{name}", 0, 0, 1, 1, {{16}}, {{16}}, 1.0f, 0, 1.0f, 0, 16, 16,
                                         {arena_bytes}u, 0}};
int8_t tsh_arena[{arena_bytes}] __attribute__((aligned(16)));
{extra}
void tsh_model_run(const void *input, void *output) {{
  const int8_t *x = input; int8_t *y = output;
  {body}
  for (int i = 0; i < 16; i++) y[i] = x[i];
}}
""")
    return d


def nops(d: Path, n: int) -> Path:
    """Exactly `n` extra instructions per inference (a straight run of NOPs)."""
    return write_model(d, f"nops-{n}", f'__asm volatile(".rept {n}\\n nop\\n .endr" ::: "memory");')


def busy(d: Path, iterations: int) -> Path:
    """An inference that takes seconds in the emulator."""
    return write_model(d, "busy", f"for (volatile uint32_t k = 0; k < {iterations}u; k++) {{}}")


def oversized(d: Path, weight_bytes: int = 0, arena_bytes: int = 16) -> Path:
    """A weight table of `weight_bytes` in flash and/or an arena of `arena_bytes` in RAM."""
    extra = f"static const int8_t weights[{weight_bytes}] = {{1}};" if weight_bytes else ""
    use = "y[0] = weights[x[0] & 0xF] + tsh_arena[x[1] & 0xF];" if weight_bytes else "tsh_arena[x[1] & 0xF] = 1;"
    return write_model(d, "oversized", use, arena_bytes=arena_bytes, extra=extra)


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
    fw = build_firmware(nops(tmp_path / "m", 10), board, kernels=False)
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
        assert dev.link.stats().runs == 1
        dev.link.reset()                                  # a system reset: counters start again
        assert dev.link.stats().runs == 0
        assert np.array_equal(dev.infer(x).output, x) and dev.link.stats().runs == 1


def test_instruction_count_is_exact_and_repeatable(fw_build, tmp_path):
    counts = {}
    for n in (100, 350):
        fw = build_firmware(nops(tmp_path / f"n{n}", n), "stm32f405", kernels=False)
        with open_board(fw) as dev:
            runs = [dev.infer(np.zeros(16, np.int8)).instructions for _ in range(3)]
        assert len(set(runs)) == 1, runs
        counts[n] = runs[0]
    assert counts[350] - counts[100] == 250


def test_model_over_budget_is_refused_naming_the_overflow(fw_build, tmp_path):
    with pytest.raises(TinyshieldError, match=r"FLASH overflowed by [\d,]+ bytes") as e:
        build_firmware(oversized(tmp_path / "f", weight_bytes=1100 * 1024), "stm32f405", kernels=False)
    assert "stm32f405" in str(e.value)
    # 200 KB of arena cannot sit in 192 KB of RAM; the same model fits the 320 KB budget of mps2-an386
    big_arena = oversized(tmp_path / "r", arena_bytes=200 * 1024)
    with pytest.raises(TinyshieldError, match=r"RAM overflowed by [\d,]+ bytes"):
        build_firmware(big_arena, "stm32f405", kernels=False)
    assert build_firmware(big_arena, "mps2-an386", kernels=False).ram_used > 200 * 1024


@pytest.mark.slow
def test_board_killed_mid_inference_gives_clear_error_and_no_zombie(fw_build, tmp_path):
    fw = build_firmware(busy(tmp_path / "m", 2_000_000_000), "stm32f405", kernels=False)
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
    fw = build_firmware(busy(tmp_path / "m", 2_000_000_000), "stm32f405", kernels=False)
    with Emulator(fw) as emu, Link(emu.url, timeout=0.3, retries=1) as link:
        pid = emu.pid
        link.upload(bytes(16))
        with pytest.raises(TinyshieldError, match=r"did not answer RUN after 2 tries \(no reply within 0.5 s\)"):
            link.run(timeout=0.5)
    assert _gone(pid)

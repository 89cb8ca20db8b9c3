"""Put firmware on a board and leave it running for later commands.

Emulated (default): boots QEMU detached from this process, checks the firmware answers, and
records the running board in build/boards/<board>.json (pid, serial URL, instruction-count file)
so `tinyshield run/eval --board <board>` talk to it. `stop()` ends it.
Real hardware (`probe=True`): programs the ELF through a debug probe with pyocd, the optional
`flash` extra.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from base.errors import TinyshieldError
from base.paths import build_dir
from mcu.boards import board as get_board
from mcu.compile import Firmware
from mcu.emulator import Emulator, pid_alive
from mcu.link import Link


@dataclass
class RunningBoard:
    board: str
    pid: int
    url: str
    count_file: str
    elf: str
    model: str

    def alive(self) -> bool:
        return pid_alive(self.pid)


def _state_file(board_id: str) -> Path:
    d = build_dir() / "boards"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{board_id}.json"


def running(board_id: str) -> RunningBoard | None:
    """The emulated board left running by `flash`, if its QEMU is still alive."""
    f = _state_file(board_id)
    if not f.is_file():
        return None
    rb = RunningBoard(**json.loads(f.read_text()))
    if not rb.alive():
        f.unlink(missing_ok=True)
        return None
    return rb


def stop(board_id: str) -> bool:
    rb = running(board_id)
    if rb is None:
        return False
    os.kill(rb.pid, signal.SIGTERM)
    for _ in range(100):
        if not rb.alive():
            break
        time.sleep(0.05)
    else:
        os.kill(rb.pid, signal.SIGKILL)
    _state_file(board_id).unlink(missing_ok=True)
    return True


def flash_emulated(fw: Firmware, port: int | None = None) -> RunningBoard:
    """Boot `fw` on its emulated board (replacing one already running) and leave it running."""
    stop(fw.board)
    emu = Emulator(fw, port=port, detach=True, work_dir=build_dir() / "boards" / fw.board).start()
    try:
        with Link(emu.url) as link:
            info = link.info()
    except TinyshieldError:
        emu.stop()
        raise
    rb = RunningBoard(fw.board, emu.pid, emu.url, str(emu.count_file), str(fw.elf), info.name)
    _state_file(fw.board).write_text(json.dumps(asdict(rb), indent=1))
    return rb


def flash_probe(elf: Path, board_id: str, probe: str | None = None) -> None:
    """Program a real board through a debug probe (ST-Link, CMSIS-DAP, J-Link) with pyocd; `probe`
    picks one probe by its unique id when several are plugged in (a rack)."""
    b = get_board(board_id)
    try:
        from pyocd.core.helpers import ConnectHelper
        from pyocd.flash.file_programmer import FileProgrammer
    except ImportError:
        raise TinyshieldError("flashing a real board needs pyocd, the optional 'flash' extra: "
                              "pip install -e '.[flash]' (or use the emulated board: drop --probe)") from None
    target = {"stm32f405": "stm32f405rg"}.get(b.id)
    if target is None:
        raise TinyshieldError(f"board {b.id} is emulated only; --probe supports: stm32f405")
    session = ConnectHelper.session_with_chosen_probe(unique_id=probe, target_override=target, blocking=False)
    if session is None:
        raise TinyshieldError(f"no debug probe{f' with unique id {probe}' if probe else ''} found: connect the "
                              "board over USB (ST-Link) and retry, or fix its probe id in the board file")
    with session:
        FileProgrammer(session).program(str(elf), file_format="elf")
        session.board.target.reset()

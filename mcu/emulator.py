"""The emulated board: QEMU running a firmware image, its UART on a local TCP port.

    with Emulator(firmware) as emu:          # boots qemu-system-arm, picks a free port
        link = Link(emu.url)                   # socket://127.0.0.1:PORT
        ...
        emu.instructions()                     # exact count of the last inference (plugin)

QEMU is started with the project's instruction-count plugin (mcu/plugin/insn_count.c) watching
the firmware's tsh_mark_begin/tsh_mark_end. A context manager, an atexit hook and (on Linux)
a parent-death signal make sure no QEMU outlives the Python process that started it — except
`detach=True`, used by `tinyshield flash` to leave a board running for later commands.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

from base.errors import TinyshieldError
from mcu.boards import Board, board as get_board
from mcu.compile import Firmware, build_plugin, require_toolchain

QEMU = "qemu-system-arm"
_running: "weakref.WeakSet[Emulator]" = weakref.WeakSet()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Runs in the child before exec: SIGTERM QEMU if the Python process dies (Linux prctl).
    The signal follows the *thread* that started QEMU, so start and use a board in one thread."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def qemu_command(fw: Firmware, board: Board, port: int, plugin: Path | None, count_file: Path | None,
                 marks_file: Path | None = None, calls_file: Path | None = None) -> list[str]:
    cmd = [QEMU, "-M", board.machine, "-nographic", "-monitor", "none",
           "-serial", f"tcp:127.0.0.1:{port},server=on,wait=off,nodelay=on", "-kernel", str(fw.elf)]
    if plugin is not None:
        arg = f"{plugin},begin={fw.mark_begin:#x},end={fw.mark_end:#x},out={count_file}"
        if marks_file is not None:
            arg += f",marks={marks_file},calls={calls_file}"
        cmd += ["-plugin", arg]
    return cmd


class Emulator:
    def __init__(self, firmware: Firmware, port: int | None = None, count_instructions: bool = True,
                 detach: bool = False, work_dir: Path | None = None, count_calls: bool = False):
        """`count_calls`: also cut each inference at every kernel call (tinyshield profile)."""
        require_toolchain(QEMU)
        if count_calls and not firmware.call_marks:
            raise TinyshieldError(f"{firmware.elf}: no kernel calls found in tsh_model_run (arm-none-eabi-objdump "
                                  "missing, or not a tinyshield model image) — install binutils-arm-none-eabi and "
                                  "rebuild (tinyshield build MODEL --force)")
        self.fw = firmware
        self.board = get_board(firmware.board)
        self.want_port = port
        self.count = count_instructions
        self.detach = detach
        self.own_dir = work_dir is None             # a temporary directory, removed by stop()
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="qemu-"))
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.count_file = self.work_dir / "instructions.txt"
        self.calls_file = self.work_dir / "calls.txt" if count_calls else None
        self.log_file = self.work_dir / "qemu.log"

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, boot_timeout: float = 10.0) -> "Emulator":
        plugin = build_plugin() if self.count else None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.count_file.unlink(missing_ok=True)
        marks = None
        if self.calls_file is not None:
            self.calls_file.unlink(missing_ok=True)
            marks = self.work_dir / "marks.txt"
            marks.write_text("".join(f"{a:#x}\n" for a in self.fw.call_marks))
        for attempt in range(5):
            port = self.want_port or _free_port()
            log = open(self.log_file, "wb")
            self.proc = subprocess.Popen(
                qemu_command(self.fw, self.board, port, plugin, self.count_file, marks, self.calls_file),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=self.detach, preexec_fn=None if self.detach else _die_with_parent)
            log.close()
            self.port = port
            if self._wait_listening(boot_timeout):
                _running.add(self)
                return self
            text = self.log_file.read_text(errors="replace")
            self.stop()
            if "Address already in use" in text and self.want_port is None:
                continue                            # another process took the port meanwhile
            raise TinyshieldError(f"QEMU ({self.board.machine}) did not start: {text.strip()[-1500:] or 'no output'}")
        raise TinyshieldError("could not find a free TCP port for the emulated board's UART")

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return True                     # QEMU's chardev accepts one client at a time; we let go
            time.sleep(0.02)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Pull the plug: SIGKILL, as if the board died."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        else:
            self.proc.wait()                        # reap: no zombie
        _running.discard(self)
        if self.own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "Emulator":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def instructions(self) -> tuple[int, int] | None:
        """(intervals counted so far, instructions of the last one) from the plugin, or None."""
        return read_count_file(self.count_file)


@atexit.register
def _stop_all():
    for emu in list(_running):
        if not emu.detach:
            emu.stop()


def read_count_file(path: Path) -> tuple[int, int] | None:
    """The plugin's "<intervals> <instructions of the last interval>" line, or None (not yet written)."""
    try:
        text = Path(path).read_text().split()
    except FileNotFoundError:
        return None
    return (int(text[0]), int(text[1])) if len(text) == 2 else None


def read_calls_file(path: Path) -> tuple[int, list[int]] | None:
    """The plugin's per-region counts: (intervals so far, [begin..call 0, call 0, ..., last call..end])."""
    try:
        vals = [int(v) for v in Path(path).read_text().split()]
    except (FileNotFoundError, ValueError):
        return None
    return (vals[0], vals[1:]) if len(vals) >= 2 else None


def pid_alive(pid: int) -> bool:
    """True while the process runs. A finished child of ours is reaped here (no zombie left)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass                                        # not our child: init reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

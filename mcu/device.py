"""A board running tinyshield firmware, seen from the host: upload an input, run, download the
output, with the on-device cost of each inference.

    with open_board(firmware) as dev:        # emulated: boots QEMU, connects over TCP
        r = dev.infer(x_int8)                # r.output, r.instructions, r.stack_bytes
    dev = connect("/dev/ttyACM0")            # a real board (no instruction count; cycles from DWT)
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import TinyshieldError
from mcu.emulator import Emulator, read_count_file
from mcu.link import Link, ModelInfo

NP_DTYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32}


@dataclass
class Inference:
    output: np.ndarray            # raw device output (int8 logits for our models), in output_shape
    instructions: int | None      # executed instructions between the markers (emulator plugin)
    cycles: int                   # DWT CYCCNT difference (0 under QEMU)
    stack_bytes: int              # stack high-water mark of this inference
    arena_bytes: int

    @property
    def peak_sram(self) -> int:
        """Arena + stack high-water: the working memory the inference needed on the device."""
        return self.arena_bytes + self.stack_bytes


class Device:
    def __init__(self, link: Link, count_file: Path | None = None, emulator: Emulator | None = None):
        self.link = link
        self.count_file = Path(count_file) if count_file else None
        self.emulator = emulator
        self.info: ModelInfo = link.info()
        self._intervals = self._count()[0] if self._count() else 0

    def _count(self) -> tuple[int, int] | None:
        return read_count_file(self.count_file) if self.count_file else None

    def _instructions_after_run(self) -> int | None:
        """The plugin rewrites its file at tsh_mark_end, before the firmware replies; allow for
        the rewrite being read half way (empty file) by trying a few times."""
        if self.count_file is None:
            return None
        for _ in range(50):
            c = self._count()
            if c is not None and c[0] > self._intervals:
                self._intervals = c[0]
                return c[1]
            time.sleep(0.002)
        raise TinyshieldError(f"the instruction counter ({self.count_file}) did not report the inference: "
                              "is QEMU running with the insn_count plugin?")

    def check_input(self, x: np.ndarray) -> bytes:
        want = NP_DTYPES[self.info.input_dtype]
        x = np.asarray(x)
        if x.dtype != want:
            raise TinyshieldError(f"input dtype {x.dtype} but the model on the board takes {self.info.input_dtype}")
        if x.nbytes != self.info.input_bytes:
            raise TinyshieldError(f"input has {x.nbytes} bytes (shape {x.shape}); the model on the board takes "
                                  f"{self.info.input_bytes} bytes, shape {self.info.input_shape}")
        return np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes()

    def infer(self, x: np.ndarray, timeout: float = 120.0) -> Inference:
        self.link.upload(self.check_input(x))
        r = self.link.run(timeout=timeout)
        n = self._instructions_after_run()
        raw = self.link.download(self.info.output_bytes)
        out = np.frombuffer(raw, dtype=np.dtype(NP_DTYPES[self.info.output_dtype]).newbyteorder("<"))
        out = out.astype(NP_DTYPES[self.info.output_dtype]).reshape(self.info.output_shape)
        return Inference(out, n, r.cycles, r.stack_bytes, self.info.arena_bytes)

    def dequantise(self, out: np.ndarray) -> np.ndarray:
        return (out.astype(np.float32) - self.info.output_zero_point) * self.info.output_scale

    def close(self):
        self.link.close()


def connect(url: str, count_file: Path | None = None, timeout: float = 5.0) -> Device:
    """A board that is already running (real, or emulated by `tinyshield flash`)."""
    return Device(Link(url, timeout=timeout), count_file)


@contextmanager
def open_board(firmware, port: int | None = None, timeout: float = 5.0):
    """Boot the emulated board with `firmware`, yield a connected Device; QEMU is stopped after."""
    with Emulator(firmware, port=port) as emu:
        link = Link(emu.url, timeout=timeout)
        try:
            yield Device(link, emu.count_file, emu)
        finally:
            link.close()

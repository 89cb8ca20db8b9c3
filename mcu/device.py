"""A board running tinyshield firmware, seen from the host: upload an input, run, download the
output, with the on-device cost of each inference.

    with open_board(firmware) as dev:        # emulated: boots QEMU, connects over TCP
        r = dev.infer(x_int8)                # r.output, r.instructions, r.stack_bytes
    dev = connect("/dev/ttyACM0")            # a real board (no instruction count; cycles from DWT)
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from base.errors import TinyshieldError
from mcu.emulator import Emulator, read_calls_file, read_count_file
from mcu.graph import DTYPES
from mcu.link import Link, ModelInfo



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
        c = self._count()
        self._intervals = c[0] if c else 0

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
        want = DTYPES[self.info.input_dtype]
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
        out = np.frombuffer(raw, dtype=np.dtype(DTYPES[self.info.output_dtype]).newbyteorder("<"))
        out = out.astype(DTYPES[self.info.output_dtype]).reshape(self.info.output_shape)
        return Inference(out, n, r.cycles, r.stack_bytes, self.info.arena_bytes)

    def call_instructions(self) -> list[int]:
        """Per-region instruction counts of the last inference (a board opened with count_calls=True):
        [entry + input copy, call 0, ..., call n-1, output copy + return]; they sum to its count."""
        calls = getattr(self.emulator, "calls_file", None)
        if calls is None:
            raise TinyshieldError("per-call instruction counts need the emulated board opened with count_calls=True")
        for _ in range(50):
            c = read_calls_file(calls)
            if c is not None and c[0] == self._intervals:
                return c[1]
            time.sleep(0.002)
        raise TinyshieldError(f"the instruction counter did not write per-call counts ({calls}) for inference "
                              f"{self._intervals}: is the plugin built from the current mcu/plugin/insn_count.c?")

    def dequantise(self, out: np.ndarray) -> np.ndarray:
        return (out.astype(np.float32) - self.info.output_zero_point) * self.info.output_scale

    def close(self):
        self.link.close()


def connect(url: str, count_file: Path | None = None, timeout: float = 5.0) -> Device:
    """A board that is already running (real, or emulated by `tinyshield flash`)."""
    return Device(Link(url, timeout=timeout), count_file)


@contextmanager
def open_board(firmware, port: int | None = None, timeout: float = 5.0, count_calls: bool = False):
    """Boot the emulated board with `firmware`, yield a connected Device; QEMU is stopped after.
    `count_calls`: the plugin also counts instructions per kernel call (Device.call_instructions)."""
    with Emulator(firmware, port=port, count_calls=count_calls) as emu:
        link = Link(emu.url, timeout=timeout)
        try:
            yield Device(link, emu.count_file, emu)
        finally:
            link.close()


@dataclass
class InputRecord:
    """One input's result on a board: what a fleet ships back and what an Evaluation is made of."""
    index: int                    # position in the evaluated data set
    output: np.ndarray            # raw device output
    instructions: int | None
    stack_bytes: int
    matches_reference: bool | None  # None: the host reference was not checked


@dataclass
class Evaluation:
    board: str
    model: str
    n: int
    accuracy: float               # argmax of the device logits vs the labels
    agreement: float              # fraction of inputs whose device logits equal the host reference bit for bit
    mismatches: list[int]         # indices where they differ
    mean_instructions: float | None
    instructions_per_mac: float | None
    macs: int
    arena_bytes: int
    stack_max: int                # deepest stack of any inference (stack painting)
    peak_sram: int                # arena + stack high-water, measured on the device
    static_ram: int               # .data + .bss of the firmware (arena and I/O buffers included)
    seconds: float
    predictions: list[int] = field(default_factory=list)   # argmax of the device output, per input
    instructions: list[int] = field(default_factory=list)  # per input (empty on a real board)

    def rows(self) -> list[tuple[str, str]]:
        ipi = f"{self.mean_instructions:,.0f}" if self.mean_instructions is not None else "n/a (no emulator)"
        ipm = f"{self.instructions_per_mac:.3f}" if self.instructions_per_mac is not None else "n/a"
        return [("board", self.board), ("model", self.model), ("inputs", f"{self.n:,}"),
                ("accuracy", f"{100 * self.accuracy:.2f}%"),
                ("agreement with host reference", f"{100 * self.agreement:.2f}% ({self.n - len(self.mismatches)}/{self.n} bit-identical)"),
                ("instructions / inference", ipi), ("MACs / inference", f"{self.macs:,}"),
                ("instructions / MAC", ipm), ("arena (planner)", f"{self.arena_bytes:,} B"),
                ("stack high-water", f"{self.stack_max:,} B"),
                ("peak SRAM (arena + stack)", f"{self.peak_sram:,} B"),
                ("static RAM (.data + .bss)", f"{self.static_ram:,} B"),
                ("wall time", f"{self.seconds:.1f} s ({self.n / max(self.seconds, 1e-9):.1f} inferences/s)")]


def run_inputs(dev: Device, built, inputs, start: int = 0, check_reference: bool = True):
    """Yield an InputRecord per input (indices from `start`). The host reference runs in a thread
    while the device computes, so checking it costs no wall time on a free core."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        for i, x in enumerate(inputs, start):
            q = built.quantise_input(x)
            ref = pool.submit(built.reference, q) if check_reference else None
            r = dev.infer(q)
            same = None if ref is None else bool(np.array_equal(r.output.reshape(-1), ref.result().reshape(-1)))
            yield InputRecord(i, r.output, r.instructions, r.stack_bytes, same)


def summarise(info: ModelInfo, records: list[InputRecord], labels, seconds: float, board: str | None = None) -> Evaluation:
    """The Evaluation of a set of records, in index order: the same numbers whichever board (or how
    many boards) produced them."""
    records = sorted(records, key=lambda r: r.index)
    n = len(records)
    preds = [int(np.argmax(r.output.reshape(-1))) for r in records]
    hits = sum(int(p == int(labels[r.index])) for p, r in zip(preds, records))
    checked = all(r.matches_reference is not None for r in records)
    mismatches = [r.index for r in records if r.matches_reference is False]
    instr = [r.instructions for r in records if r.instructions is not None]
    stack_max = max((r.stack_bytes for r in records), default=0)
    mean_i = float(np.mean(instr)) if instr else None
    macs = int(info.macs)
    return Evaluation(board or info.board, info.name, n, hits / max(n, 1),
                      1 - len(mismatches) / max(n, 1) if checked else float("nan"), mismatches, mean_i,
                      mean_i / macs if mean_i and macs else None, macs, info.arena_bytes, stack_max,
                      info.arena_bytes + stack_max, info.static_ram, seconds, preds, instr)


def chunk_ranges(n: int, boards: int, size: int | None = None) -> list[tuple[int, int, int]]:
    """(chunk, start, stop) ranges covering inputs 0..n-1 in order, for `boards` boards taking the next
    chunk when free. Small chunks keep boards of different speed busy to the end and lose little when a
    board fails; ~4 per board, at most 16 inputs, unless `size` is given."""
    size = size or max(1, min(16, n // (4 * max(boards, 1)) or 1))
    return [(c, s, min(s + size, n)) for c, s in enumerate(range(0, n, size))]


def merge(info: ModelInfo, records, n: int, labels, seconds: float, board: str | None = None) -> Evaluation:
    """The Evaluation of records coming back from several boards: every input 0..n-1 exactly once, else
    an error (a lost or doubled input would change the figures silently)."""
    records = list(records)
    got = sorted(r.index for r in records)
    if got != list(range(n)):
        missing = sorted(set(range(n)) - set(got))
        raise TinyshieldError(f"board results do not cover inputs 0..{n - 1} exactly once ({len(got)} records, "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}): results not merged")
    return summarise(info, records, labels, seconds, board)


def evaluate(dev: Device, built, inputs, labels, progress_bar=None, check_reference: bool = True) -> Evaluation:
    """Run every input on the device; compare with the labels and with the host int8 reference."""
    t0 = time.monotonic()
    task = progress_bar.add_task(f"eval on {dev.info.board}", total=len(inputs), info="") if progress_bar else None
    records, hits, bad = [], 0, 0
    for rec in run_inputs(dev, built, inputs, check_reference=check_reference):
        records.append(rec)
        hits += int(np.argmax(rec.output.reshape(-1)) == int(labels[rec.index]))
        bad += int(rec.matches_reference is False)
        if progress_bar:
            k = len(records)
            progress_bar.update(task, advance=1, info=f"acc {hits / k:.3f} agree {1 - bad / k:.3f}")
    return summarise(dev.info, records, labels, time.monotonic() - t0)

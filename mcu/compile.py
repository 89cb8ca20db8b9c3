"""Firmware build: generated model sources + the device runtime + a board -> an ELF image.

`build_firmware(model_dir, board)` compiles `mcu/firmware/*.c` (runtime, startup, the board's UART
driver), the C kernels in `mcu/firmware/kernels/`, and the generated `model.c` with
arm-none-eabi-gcc, links with the board's linker script (mcu/firmware/link.ld.in filled from
mcu/boards.py) and `--print-memory-usage`, and caches the result under build/firmware/<hash of
every input>/. A model that does not fit fails at link time; the error names the region and the
overflow in bytes.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from base.errors import TinyshieldError
from base.paths import build_dir
from mcu.boards import Board, board as get_board

FIRMWARE = Path(__file__).resolve().parent / "firmware"
PLUGIN = Path(__file__).resolve().parent / "plugin"
CC = "arm-none-eabi-gcc"
CFLAGS = ["-std=c99", "-O2", "-g", "-Wall", "-Wextra", "-ffunction-sections", "-fdata-sections",
          "-fno-common"]
LDFLAGS = ["-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs", "-Wl,--gc-sections",
           "-Wl,--print-memory-usage"]


@dataclass
class Firmware:
    elf: Path
    board: str
    flash_used: int
    flash_bytes: int
    ram_used: int                 # static RAM: .data + .bss + the minimum stack reservation
    ram_bytes: int
    mark_begin: int               # addresses of tsh_mark_begin / tsh_mark_end (Thumb bit cleared)
    mark_end: int
    input_bytes: int
    output_bytes: int
    cached: bool = False
    # where the plugin cuts an inference into per-call instruction counts (see _call_marks)
    call_marks: list[int] = field(default_factory=list)
    taps: int = 0                 # segments of a tap build (STEP/PEEK commands), 0 otherwise

    def summary(self) -> str:
        return (f"{self.elf}\n  board {self.board}: flash {self.flash_used:,} / {self.flash_bytes:,} B "
                f"({100 * self.flash_used / self.flash_bytes:.1f}%), RAM {self.ram_used:,} / {self.ram_bytes:,} B "
                f"({100 * self.ram_used / self.ram_bytes:.1f}%)")

    def to_json(self) -> dict:
        d = asdict(self)
        d["elf"] = str(self.elf)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Firmware":
        return cls(**{**d, "elf": Path(d["elf"])})


def require_toolchain(*tools: str) -> None:
    missing = [t for t in (tools or (CC,)) if shutil.which(t) is None]
    if missing:
        raise TinyshieldError(f"missing {', '.join(missing)}: run `make setup` "
                              "(installs gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm)")


def _sources(board: Board, model_dir: Path, kernels: bool) -> list[Path]:
    runtime = [p for p in sorted(FIRMWARE.glob("*.c")) if not p.name.startswith("uart_")]
    runtime.append(FIRMWARE / f"uart_{board.uart}.c")
    kernels = sorted((FIRMWARE / "kernels").glob("*.c")) if kernels else []
    return runtime + kernels + sorted(model_dir.glob("*.c"))


def _io_bytes(model_dir: Path, input_bytes: int | None, output_bytes: int | None) -> tuple[int, int]:
    """The I/O buffer sizes: given, or read from model.h's TSH_MODEL_INPUT_BYTES / _OUTPUT_BYTES."""
    if input_bytes is not None and output_bytes is not None:
        return input_bytes, output_bytes
    header = (model_dir / "model.h").read_text()
    found = {k: int(v) for k, v in re.findall(r"#define\s+TSH_MODEL_(INPUT|OUTPUT)_BYTES\s+(\d+)", header)}
    if "INPUT" not in found or "OUTPUT" not in found:
        raise TinyshieldError(f"{model_dir / 'model.h'} does not define TSH_MODEL_INPUT_BYTES/TSH_MODEL_OUTPUT_BYTES: "
                              "pass input_bytes= and output_bytes= to build_firmware")
    return found["INPUT"], found["OUTPUT"]


def _symbols(elf: Path) -> dict[str, int]:
    out = subprocess.run(["arm-none-eabi-nm", str(elf)], capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    return syms


def _call_marks(elf: Path) -> list[int]:
    """Where the plugin cuts an inference into per-call counts: the first kernel call instruction (`bl
    tsh_<kernel>`) of tsh_model_run, then the return address of every kernel call. The regions between
    are: entry and input copy, call 0, ..., call n-1 (each with its argument set-up), output copy and
    return. Read from the image itself, so the profiled firmware is the deployed one, unchanged."""
    r = subprocess.run(["arm-none-eabi-objdump", "-d", "--no-show-raw-insn", "--disassemble=tsh_model_run", str(elf)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return []
    lines = [ln for ln in r.stdout.splitlines() if re.match(r"^\s+[0-9a-f]+:\t", ln)]
    marks = []
    for i, ln in enumerate(lines):
        m = re.match(r"^\s+([0-9a-f]+):\tbl\s+[0-9a-f]+ <(tsh_\w+)>", ln)
        if m and i + 1 < len(lines):
            if not marks:
                marks.append(int(m.group(1), 16))
            marks.append(int(lines[i + 1].split(":")[0], 16))
    return marks


def _tap_segments(model_dir: Path) -> int:
    m = re.search(r"#define\s+TSH_MODEL_SEGMENTS\s+(\d+)", (model_dir / "model.h").read_text())
    return int(m.group(1)) if m else 0


def _memory_usage(text: str) -> dict[str, int]:
    """Parse ld's --print-memory-usage table: '  FLASH:  12345 B  1 MB  1.18%'."""
    units = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}
    used = {}
    for region, n, unit in re.findall(r"^\s*(\w+):\s+(\d+)\s+(B|KB|MB|GB)\s", text, re.M):
        used[region] = int(n) * units[unit]
    return used


def _overflow_error(log: str, board: Board) -> TinyshieldError | None:
    hits = re.findall(r"region `(\w+)' overflowed by (\d+) bytes", log)
    if not hits:
        return None
    budget = {"FLASH": board.flash_bytes, "RAM": board.ram_bytes}
    parts = [f"{region} overflowed by {int(n):,} bytes (budget {budget.get(region, 0):,} B)" for region, n in hits]
    what = {"FLASH": "compress the weights (int8, clustered low-rank embedding)",
            "RAM": f"use a tiled schedule or a smaller sequence length (RAM also keeps {board.min_stack:,} B of stack)"}
    hints = "; ".join(what[r] for r, _ in dict.fromkeys(hits) if r in what)
    return TinyshieldError(f"model does not fit board {board.id}: {', '.join(parts)} — {hints}, "
                           f"or pick a bigger board")


def build_firmware(model_dir: str | Path, board: str | Board | None = None, *, input_bytes: int | None = None,
                   output_bytes: int | None = None, extra_cflags: tuple[str, ...] = (), kernels: bool = True,
                   force: bool = False, quiet: bool = True) -> Firmware:
    """Compile and link the firmware for `board` around the generated sources in `model_dir`.
    `kernels=False` leaves out mcu/firmware/kernels/ (for a model.c that brings its own code)."""
    require_toolchain()
    b = board if isinstance(board, Board) else get_board(board)
    model_dir = Path(model_dir)
    if not (model_dir / "model.c").is_file() or not (model_dir / "model.h").is_file():
        raise TinyshieldError(f"{model_dir} has no model.c/model.h: generate them first (tinyshield build MODEL)")
    in_b, out_b = _io_bytes(model_dir, input_bytes, output_bytes)
    srcs = _sources(b, model_dir, kernels)
    headers = [*sorted(FIRMWARE.glob("*.h")), *(sorted((FIRMWARE / "kernels").glob("*.h")) if kernels else []),
               *sorted(model_dir.glob("*.h"))]
    defines = {**b.defines(), "TSH_INPUT_BYTES": f"{in_b}u", "TSH_OUTPUT_BYTES": f"{out_b}u"}
    flags = [*b.gcc_flags(), *CFLAGS, *extra_cflags, *(f"-D{k}={v}" for k, v in defines.items()),
             f"-I{FIRMWARE}", f"-I{FIRMWARE / 'kernels'}", f"-I{model_dir}"]

    h = hashlib.sha256()
    for p in [*srcs, *headers, FIRMWARE / "link.ld.in"]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(json.dumps([asdict(b), flags[: -3], LDFLAGS], sort_keys=True).encode())
    out = build_dir() / "firmware" / h.hexdigest()[:16]
    meta = out / "firmware.json"
    if meta.is_file() and (out / "fw.elf").is_file() and not force:
        fw = Firmware.from_json(json.loads(meta.read_text()))
        fw.cached = True
        if not fw.call_marks:      # cached before per-call profiling: read them from the image
            fw.call_marks = _call_marks(fw.elf)
        return fw

    out.mkdir(parents=True, exist_ok=True)
    ld = out / "link.ld"
    ld.write_text((FIRMWARE / "link.ld.in").read_text().format(**asdict(b)))
    elf = out / "fw.elf"
    cmd = [CC, *flags, *(str(s) for s in srcs), f"-T{ld}", *LDFLAGS, f"-Wl,-Map={out / 'fw.map'}", "-o", str(elf)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stdout + r.stderr
    (out / "build.log").write_text(" ".join(cmd) + "\n" + log)
    if r.returncode != 0:
        err = _overflow_error(log, b)
        if err is not None:
            raise err
        raise TinyshieldError(f"firmware build for {b.id} failed (log: {out / 'build.log'}):\n{log.strip()[-3000:]}")
    used = _memory_usage(log)
    syms = _symbols(elf)
    fw = Firmware(elf=elf, board=b.id, flash_used=used.get("FLASH", 0), flash_bytes=b.flash_bytes,
                  ram_used=used.get("RAM", 0), ram_bytes=b.ram_bytes,
                  mark_begin=syms["tsh_mark_begin"] & ~1, mark_end=syms["tsh_mark_end"] & ~1,
                  input_bytes=in_b, output_bytes=out_b, call_marks=_call_marks(elf),
                  taps=_tap_segments(model_dir))
    meta.write_text(json.dumps(fw.to_json(), indent=1))
    if not quiet:
        print(log.strip())
    return fw


def build_plugin() -> Path:
    """The instruction-count QEMU plugin, built with the host C compiler and cached (base/cbuild.py)."""
    from base.cbuild import build_shared
    return build_shared([PLUGIN / "insn_count.c"], ["-shared", "-fPIC", "-O2", "-Wall", "-Wextra",
                                                    "-fvisibility=hidden"], "libinsn_count")

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


def build_plugin(force: bool = False) -> Path:
    """The instruction-count QEMU plugin, built with the host gcc and cached under build/plugin/."""
    src = PLUGIN / "insn_count.c"
    key = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    so = build_dir() / "plugin" / f"libinsn_count-{key}.so"
    if so.is_file() and not force:
        return so
    if shutil.which("gcc") is None:
        raise TinyshieldError("no host gcc to build the instruction-count plugin: install gcc (Debian: build-essential)")
    so.parent.mkdir(parents=True, exist_ok=True)
    tmp = so.with_suffix(".tmp")
    r = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden",
                        "-o", str(tmp), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        raise TinyshieldError(f"building the QEMU plugin failed:\n{r.stderr.strip()}")
    tmp.replace(so)
    return so


# ---------------------------------------------------------------- model -> firmware

@dataclass
class BuiltModel:
    """Everything about one model deployed to one board: the int8 graph, its schedule and arena
    plan (the host reference runs exactly these), the generated C and the firmware image."""
    name: str
    kind: str                     # "vit", "bert-classifier", "pt2"
    board: str
    graph: object                 # mcu.graph.Graph
    schedule: object              # mcu.graph.Schedule
    plan: object                  # mcu.planner.ArenaPlan
    source_dir: Path
    firmware: Firmware

    @property
    def macs(self) -> int:
        return self.schedule.macs()

    def quantise_input(self, x) -> "np.ndarray":
        """Raw model input -> what the device takes, exactly as the reference quantises: token ids as
        int32; float inputs (uint8 images count as p/255) rounded to the input's int8 scale and laid
        out as the board stores them (NCHW images as HWC)."""
        return quantise_input(self.graph, x)

    def reference(self, q) -> "np.ndarray":
        """The host int8 reference output for a device input (same schedule, same arena plan)."""
        from mcu.execute import run
        return run(self.schedule, {self.graph.inputs[0]: q}, self.plan)[self.graph.outputs[0]]


def _schedule(graph, kind: str, board: Board):
    from mcu.schedules import schedule

    if kind in ("tiled", "recompute"):
        # With the board's budget the tile search picks the fewest MACs, then calls (code size,
        # instructions), that still fit, instead of the smallest peak; K/V are recomputed only
        # where keeping them does not fit (always, for "recompute").
        from mcu.profile import board_budget
        return schedule(graph, kind, budget=board_budget(board.id, graph))
    return schedule(graph, kind)


def quantise_input(graph, x) -> "np.ndarray":
    """A raw input (one example, with or without its batch dimension of 1) -> the graph's int8/int32 input."""
    import numpy as np
    t = graph.tensors[graph.inputs[0]]
    m = graph.meta
    x = np.asarray(x)
    if m.get("input_kind") == "ids":
        if x.size != int(np.prod(t.shape)) or not np.issubdtype(x.dtype, np.integer):
            raise TinyshieldError(f"token ids must be {int(np.prod(t.shape))} integers, got {x.dtype} {x.shape}")
        return x.astype(np.int32).reshape(t.shape)
    shape = tuple(m["input_shape"])
    if x.size != int(np.prod(shape)):
        raise TinyshieldError(f"input must have shape {shape[1:]} (or {shape}), got {x.shape}")
    xf = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    xf = xf.reshape(shape)
    if m.get("input_layout") == "nchw->hwc":
        xf = xf[0].transpose(1, 2, 0)
    scale, zp = m["input_q"]
    q = np.round(xf / scale) + zp
    return np.clip(q, -128, 127).astype(np.int8).reshape(t.shape)


@dataclass
class _Source:
    model: object                 # the float torch model (None for a .pt2)
    kind: str                     # "vit", "bert-classifier", "pt2"
    path: Path | None
    clr: object = None            # edge.compress.clr.QuantCLR: the int8 CLR word table, if compressed
    captured: object = None       # edge.capture.Captured of a .pt2


def _load(spec: str) -> _Source:
    """A recipe name / model directory (edge.models.registry), a CLR-compressed directory written by
    `tinyshield compress` (kind "bert-classifier-clr", edge.compress.io), or a `.pt2` ExportedProgram."""
    p = Path(spec)
    if p.suffix == ".pt2":
        from edge.capture import load
        return _Source(None, "pt2", p, captured=load(p))
    if p.is_dir() and (p / "config.json").is_file():
        kind = json.loads((p / "config.json").read_text()).get("kind", "")
        if kind.endswith("-clr"):
            from edge.compress.io import load_compressed
            c = load_compressed(p)
            return _Source(c.model.eval(), kind.removesuffix("-clr"), p, c.quant)
    from edge.models.registry import resolve
    loaded = resolve(spec)
    return _Source(loaded.model, loaded.kind, loaded.path)


def calibration_inputs(src: _Source, calib: int, seq_len: int | None, calib_file: str | Path | None = None):
    """Batch-first calibration inputs: from `calib_file` (.npy, or .npz with `x`), else the recipe's
    training data (MNIST images as floats in [0, 1], SST-2 sentences as padded token ids)."""
    import numpy as np
    if calib_file is not None:
        from base.data import load_array
        return load_array(calib_file, "x")[:calib]
    if src.kind == "vit":
        from base.data import data_dir, mnist
        ds = mnist(allow_fallback=data_dir(required=False) is None)
        return ds.x_train[:calib].astype(np.float32)[:, None] / np.float32(255.0)
    if src.kind == "bert-classifier":
        from base.data import sst2
        from edge.models.minilm import load_tokenizer, tokenize
        L = seq_len or 64
        cfg = src.model.config
        if L > cfg.max_position_embeddings:
            raise TinyshieldError(f"seq_len {L} exceeds the model's max_position_embeddings "
                                  f"{cfg.max_position_embeddings}: use a shorter --seq-len")
        return tokenize(load_tokenizer(), sst2("train").texts[:calib], pad_to=L).input_ids.numpy()
    raise TinyshieldError(f"{src.path or src.kind}: no calibration data: pass --calib FILE.npy (batch-first inputs)")


def float_outputs(spec: str, graph, xs) -> "np.ndarray":
    """The float model's outputs (batch of one each) on raw inputs, as the int8 graph's input sees them:
    the captured program of a .pt2, the recipe's module otherwise."""
    import numpy as np
    import torch

    src = _load(spec)
    fn = src.captured.program.module() if src.captured is not None else src.model.eval()
    with torch.no_grad():
        return np.stack([fn(float_input(graph, x)).reshape(-1).numpy() for x in xs])


def float_input(graph, x) -> "torch.Tensor":
    """One raw input as the float model takes it: token ids (1, L) int64, or floats of the captured input
    shape (uint8 images count as p/255, as in `quantise_input`)."""
    import numpy as np
    import torch

    x = np.asarray(x)
    if graph.meta.get("input_kind") == "ids":
        return torch.as_tensor(x.astype(np.int64)).reshape(1, -1)
    xf = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32)
    return torch.as_tensor(xf).reshape(graph.meta["input_shape"])


def _lower(src: _Source, calib: int, seq_len: int | None, calib_file=None):
    """Capture the model once (torch.export), calibrate on the captured graph, lower it to int8."""
    from edge.capture import calibrate
    from mcu.from_aten import lower_captured, lower_module

    xs = calibration_inputs(src, calib, seq_len, calib_file)
    name = f"{src.path.stem if src.kind == 'pt2' else src.kind}-int8"
    if src.captured is None:
        clr = {"bert.embeddings.word_embeddings": src.clr} if src.clr is not None else None
        return lower_module(src.model, xs, name, clr=clr)
    return lower_captured(src.captured, calibrate(src.captured, [x[None] for x in xs]), name)


RUNTIME_FLASH = 8 * 1024       # the runtime and kernels take less flash than this; used for early refusals
# The runtime's own static RAM besides the arena and the I/O buffers: CRC table, UART frames, RX ring
# (5,212 B in the map file) plus alignment padding. The arena budget leaves it out; the link is exact.
RUNTIME_RAM = 5_376


def check_budget(graph, plan, board: Board) -> None:
    """Refuse a model that cannot fit before generating and compiling it: its weights alone
    against the flash budget, its arena + I/O buffers + minimum stack against RAM. The link is
    the exact check (see _overflow_error); these are lower bounds of the overflow."""
    t_in, t_out = graph.tensors[graph.inputs[0]], graph.tensors[graph.outputs[0]]
    flash = graph.const_bytes() + RUNTIME_FLASH
    ram = plan.arena_bytes + t_in.nbytes + t_out.nbytes + board.min_stack
    over = []
    if flash > board.flash_bytes:
        over.append(f"FLASH overflowed by at least {flash - board.flash_bytes:,} bytes (weights {graph.const_bytes():,} B, "
                    f"budget {board.flash_bytes:,} B) — compress the weights (int8, clustered low-rank embedding)")
    if ram > board.ram_bytes:
        over.append(f"RAM overflowed by at least {ram - board.ram_bytes:,} bytes (arena {plan.arena_bytes:,} B + I/O "
                    f"{t_in.nbytes + t_out.nbytes:,} B + stack {board.min_stack:,} B, budget {board.ram_bytes:,} B) — "
                    "use a tiled schedule or a shorter sequence")
    if over:
        raise TinyshieldError(f"model {graph.name} does not fit board {board.id}: " + "; ".join(over)
                              + "; or pick a bigger board")


def deploy_graph(graph, board: str | Board | None, out_dir: Path, schedule: str = "layerwise",
                 force: bool = False):
    """int8 graph -> schedule -> checked arena plan -> budget check -> C sources -> firmware.
    Returns (schedule, plan, firmware)."""
    from mcu.codegen import generate
    from mcu.planner import check, plan as make_plan

    b = board if isinstance(board, Board) else get_board(board)
    sched = _schedule(graph, schedule, b)
    plan = make_plan(sched)
    check(plan, sched)
    check_budget(graph, plan, b)
    src = Path(out_dir) / "src"
    if force or not (src / "model.c").is_file():
        generate(sched, plan, src)
    t_in, t_out = graph.tensors[graph.inputs[0]], graph.tensors[graph.outputs[0]]
    fw = build_firmware(src, b, input_bytes=t_in.nbytes, output_bytes=t_out.nbytes, force=force)
    return sched, plan, fw


def firmware_variant(built: "BuiltModel", taps: bool = False, schedule=None, force: bool = False) -> Firmware:
    """Another firmware of a deployed model, same schedule and arena plan: `taps=True` is the tap build
    (the firmware can step the inference segment by segment and let the host read the arena: STEP/PEEK,
    for tinyshield validate). `schedule` replaces the deployed schedule's calls (same buffers and plan),
    e.g. to build a device image that deliberately differs from the host reference."""
    from mcu.codegen import generate

    sched = schedule if schedule is not None else built.schedule
    src = Path(built.source_dir).parent / ("src" + ("-taps" if taps else "") + ("-custom" if schedule is not None else ""))
    if force or schedule is not None or not (src / "model.c").is_file():
        generate(sched, built.plan, src, taps=taps)
    t_in, t_out = built.graph.tensors[built.graph.inputs[0]], built.graph.tensors[built.graph.outputs[0]]
    return build_firmware(src, built.board, input_bytes=t_in.nbytes, output_bytes=t_out.nbytes, force=force)


PIPELINE = ["edge/capture.py", "mcu/from_aten.py", "mcu/lower.py", "mcu/kernels.py", "mcu/tiled.py", "mcu/schedules.py", "mcu/planner.py",
            "mcu/codegen.py", "mcu/graph.py", "mcu/build.py", "base/quant.py", "edge/compress/clr.py"]


def _pipeline_hash() -> str:
    """Hash of the code that turns a model into C: a cached graph or generated source is stale
    as soon as the lowering, the numerics or the code generator change."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in PIPELINE:
        p = root / rel
        h.update(rel.encode() + b"\0" + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()[:16]


def build_model(spec: str, board: str | None = None, schedule: str = "layerwise", calib: int = 500,
                seq_len: int | None = None, force: bool = False, name: str | None = None,
                calib_file: str | Path | None = None) -> BuiltModel:
    """MODEL spec (recipe, model directory or .pt2) -> captured graph -> int8 graph (PTQ on `calib`
    inputs: the recipe's training data or `calib_file`) -> `deploy_graph`. The graph and the generated C
    are cached under build/deploy/<hash>/ by weights, calibration data, board and options."""
    import pickle

    from base.paths import artefact_dir

    b = get_board(board)
    src = _load(spec)
    weights = src.path if src.kind == "pt2" else (src.path / "model.safetensors") if src.path else None
    digest = lambda f: hashlib.sha256(Path(f).read_bytes()).hexdigest() if f else None   # noqa: E731
    from base.data import data_dir
    # the recipes calibrate on the data folder when there is one, else on the shipped fallback samples
    calib_data = None if calib_file else str(data_dir(required=False))
    key = {"spec": spec, "weights": digest(weights), "calib_file": digest(calib_file), "calib_data": calib_data,
           "board": b.id, "schedule": schedule, "calib": calib, "seq_len": seq_len, "code": _pipeline_hash(),
           "version": 3}
    d = artefact_dir("deploy", key)
    cached = d / "graph.pkl"
    if cached.is_file() and not force:
        graph = pickle.loads(cached.read_bytes())
    else:
        graph = _lower(src, calib, seq_len, calib_file)
        cached.write_bytes(pickle.dumps(graph))
    sched, plan, fw = deploy_graph(graph, b, d, schedule, force=force)
    return BuiltModel(name or (spec if not Path(spec).is_dir() else Path(spec).name), src.kind, b.id,
                      graph, sched, plan, d / "src", fw)

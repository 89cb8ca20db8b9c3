"""The deployment pipeline: MODEL (recipe, model directory, .pt2) -> captured graph -> int8 graph (calibrated)
-> schedule -> checked arena plan -> budget check -> C sources -> firmware (mcu/compile.py), cached under
build/deploy/<hash of every input>/. `build_model` is what `build`, `run`, `eval`, the benchmarks and
`tinyshield.deploy` call.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from base.errors import TinyshieldError
from mcu.boards import Board, board as get_board
from mcu.compile import Firmware, build_firmware

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

    def test_set(self, dataset: str, limit: int, data: str | None = None):
        """(inputs, labels, where from) to evaluate this model on: `data`, else the recipe's test set."""
        from edge.inputs import test_set
        seq_len = self.graph.tensors[self.graph.inputs[0]].shape[0] if self.kind == "bert-classifier" else None
        return test_set(dataset, self.kind, seq_len, limit, data)

    def reference(self, q) -> "np.ndarray":
        """The host int8 reference output for a device input (same schedule, same arena plan)."""
        from mcu.execute import run
        return run(self.schedule, {self.graph.inputs[0]: q}, self.plan)[self.graph.outputs[0]]


def _schedule(graph, kind: str, board: Board):
    from mcu.schedules import schedule

    if kind == "tiled" and graph.meta.get("source") == "tflite":     # an imported graph: row blocks
        from mcu.tflite_schedule import search_rows
        return search_rows(graph)
    if kind in ("tiled", "recompute"):
        # With the board's budget the tile search picks the fewest MACs, then calls (code size,
        # instructions), that still fit, instead of the smallest peak; K/V are recomputed only
        # where keeping them does not fit (always, for "recompute").
        from mcu.boards import arena_budget
        return schedule(graph, kind, budget=arena_budget(board.id, graph))
    return schedule(graph, kind)


def quantise_input(graph, x) -> "np.ndarray":
    """A raw input (one example, with or without its batch dimension of 1) -> the graph's int8/int32 input."""
    import numpy as np
    t = graph.tensors[graph.inputs[0]]
    m = graph.meta
    x = np.asarray(x)
    if str(m.get("input_kind", "")).startswith("tflite"):
        from mcu.from_tflite import quantise_input as tflite_input
        return tflite_input(graph, x)
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
class Source:
    """A model to deploy, as loaded: the float torch module or a captured .pt2 program."""
    model: object                 # the float torch model (None for a .pt2)
    kind: str                     # "vit", "bert-classifier", "bert", "minilm", "pt2"
    path: Path | None
    clr: object = None            # edge.compress.clr.QuantCLR: the int8 CLR word table, if compressed
    captured: object = None       # edge.capture.Captured of a .pt2


def load_source(spec: str, train_if_missing: bool = True) -> Source:
    """A recipe name / model directory (edge.models.registry), a CLR-compressed directory written by
    `tinyshield compress` (kind "bert-classifier-clr", edge.compress.io), or a `.pt2` ExportedProgram."""
    p = Path(spec)
    if p.suffix == ".pt2":
        from edge.capture import load
        return Source(None, "pt2", p, captured=load(p))
    if p.is_dir() and (p / "config.json").is_file():
        kind = json.loads((p / "config.json").read_text()).get("kind", "")
        if kind.endswith("-clr"):
            from edge.compress.io import load_compressed
            c = load_compressed(p)
            return Source(c.model.eval(), kind.removesuffix("-clr"), p, c.quant)
    from edge.models.registry import resolve
    loaded = resolve(spec, train_if_missing=train_if_missing)
    return Source(loaded.model, loaded.kind, loaded.path)


def calibration_inputs(src: Source, calib: int, seq_len: int | None, calib_file: str | Path | None = None,
                       random_seed: int | None = None):
    """Batch-first calibration inputs: from `calib_file` (.npy, or .npz with `x`), else the recipe's
    training data (MNIST images as floats in [0, 1], SST-2 sentences as padded token ids), or with
    `random_seed` random inputs of the same kind (memory planning: scales change no buffer size; a .pt2
    then calibrates on its own example input)."""
    import numpy as np
    if calib_file is not None:
        from base.data import load_array
        return load_array(calib_file, "x")[:calib]
    if src.kind == "pt2" and random_seed is not None:
        return src.captured.example[0].numpy()
    bert = {"bert-classifier": lambda m: m.bert, "bert": lambda m: m, "minilm": lambda m: m}.get(src.kind)
    L = seq_len or 64
    if bert is not None and L > bert(src.model).config.max_position_embeddings:
        raise TinyshieldError(f"seq_len {L} exceeds the model's {bert(src.model).config.max_position_embeddings} "
                              "positions (max_position_embeddings): use a shorter --seq-len")
    if random_seed is not None:
        rng = np.random.default_rng(random_seed)
        if src.kind == "vit":
            from base.data import image_batch
            size = src.model.config.image_size
            return image_batch(rng.integers(0, 256, (calib, size, size)).astype(np.uint8))
        if bert is not None:
            return rng.integers(1, bert(src.model).config.vocab_size, (calib, L))
    elif src.kind == "vit":
        from base.data import data_dir, mnist
        ds = mnist(allow_fallback=data_dir(required=False) is None)
        return ds.x_train[:calib].astype(np.float32)[:, None] / np.float32(255.0)
    elif src.kind == "bert-classifier":
        from base.data import sst2
        from edge.models.minilm import load_tokenizer, tokenize
        return tokenize(load_tokenizer(), sst2("train").texts[:calib], pad_to=L).input_ids.numpy()
    raise TinyshieldError(f"{src.path or src.kind}: no calibration data: pass --calib FILE.npy (batch-first inputs)")


def float_outputs(spec: str, graph, xs) -> "np.ndarray":
    """The float model's outputs (batch of one each) on raw inputs, as the int8 graph's input sees them:
    the captured program of a .pt2, the recipe's module otherwise."""
    import numpy as np
    import torch

    src = load_source(spec)
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


def lower_source(src: Source, calib: int, seq_len: int | None, calib_file=None, random_seed: int | None = None,
                 name: str | None = None):
    """Capture the model once (torch.export), calibrate on the captured graph, lower it to int8: the one path
    from a model to its int8 graph (`build_model` and memory planning, mcu.profile.planning_graph)."""
    from edge.capture import calibrate
    from mcu.from_aten import lower_captured, lower_module

    xs = calibration_inputs(src, calib, seq_len, calib_file, random_seed)
    name = name or f"{src.path.stem if src.kind == 'pt2' else src.kind}-int8"
    if src.captured is None:
        clr = {"bert.embeddings.word_embeddings": src.clr} if src.clr is not None else None
        return lower_module(src.model, xs, name, clr=clr)
    return lower_captured(src.captured, calibrate(src.captured, [x[None] for x in xs]), name)


def check_budget(graph, plan, board: Board) -> None:
    """Refuse a model that cannot fit before generating and compiling it: its weights alone against the
    flash budget, its arena against the board's arena budget (mcu.boards.arena_budget: RAM less stack,
    runtime and I/O buffers). The link is the exact check (mcu.compile); these are lower bounds of the overflow."""
    from mcu.boards import RUNTIME_FLASH, RUNTIME_RAM, arena_budget
    t_in, t_out = graph.tensors[graph.inputs[0]], graph.tensors[graph.outputs[0]]
    flash = graph.const_bytes() + RUNTIME_FLASH
    budget = arena_budget(board.id, graph)
    over = []
    if flash > board.flash_bytes:
        over.append(f"FLASH overflowed by at least {flash - board.flash_bytes:,} bytes (weights {graph.const_bytes():,} B, "
                    f"budget {board.flash_bytes:,} B) — compress the weights (int8, clustered low-rank embedding)")
    if plan.arena_bytes > budget:
        over.append(f"RAM overflowed by at least {plan.arena_bytes - budget:,} bytes (arena {plan.arena_bytes:,} B + I/O "
                    f"{t_in.nbytes + t_out.nbytes:,} B + stack {board.min_stack:,} B + runtime {RUNTIME_RAM:,} B, "
                    f"budget {board.ram_bytes:,} B) — use a tiled schedule or a shorter sequence")
    if over:
        raise TinyshieldError(f"model {graph.name} does not fit board {board.id}: " + "; ".join(over)
                              + "; or pick a bigger board")


def deploy_graph(graph, board: str | Board | None, out_dir: Path, schedule: str = "layerwise",
                 force: bool = False):
    """int8 graph -> schedule -> checked arena plan -> budget check -> C sources -> firmware.
    Returns (schedule, plan, firmware)."""
    from mcu.codegen import generate
    from mcu.planner import check, plan as make_plan
    from mcu.weight_layout import widen_fc_weights

    b = board if isinstance(board, Board) else get_board(board)
    # fully connected weights widened to int16 where the flash has room (same outputs, fewer instructions):
    # fc_s8w16's assembly block is the Cortex-M4's; other cores keep their own fc_s8 paths
    sched = _schedule(graph, schedule, b)
    if b.cpu == "cortex-m4":
        sched = widen_fc_weights(sched, b.flash_bytes)
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


def _pipeline_hash() -> str:
    """Hash of the code that turns a model into C: every module of mcu/ and the base/edge modules the
    lowering reads. A cached graph or generated source is stale as soon as the lowering, the numerics or
    the code generator change; the list is derived, so a new lowering module is covered when it is added."""
    from base.paths import PROJECT_ROOT, files_hash
    return files_hash([*(PROJECT_ROOT / "mcu").glob("*.py"),
                       *(PROJECT_ROOT / f for f in ("base/quant.py", "edge/capture.py", "edge/compress/clr.py"))])


def build_model(spec: str, board: str | None = None, schedule: str = "layerwise", calib: int = 500,
                seq_len: int | None = None, force: bool = False, name: str | None = None,
                calib_file: str | Path | None = None) -> BuiltModel:
    """MODEL spec -> int8 graph -> `deploy_graph`. A recipe, model directory or .pt2 is captured and
    quantised (PTQ on `calib` inputs: the recipe's training data or `calib_file`); a .tflite is already int8
    and is imported as TFLite Micro computes it (mcu.from_tflite). The graph and the generated C are cached
    under build/deploy/<hash>/ by the model's bytes, calibration data, board and options; a refused model
    writes nothing (the folder is made once the graph exists)."""
    import pickle

    from base.paths import build_dir, config_hash

    b = get_board(board)
    digest = lambda f: hashlib.sha256(Path(f).read_bytes()).hexdigest() if f else None   # noqa: E731
    common = {"board": b.id, "schedule": schedule, "code": _pipeline_hash()}
    if Path(spec).suffix == ".tflite":
        from mcu.from_tflite import lower_tflite, read
        data, where = read(spec)
        kind, key = "tflite", {**common, "tflite": hashlib.sha256(data).hexdigest(), "version": 1}
        make = lambda: lower_tflite(data, Path(where).stem)   # noqa: E731
    else:
        from base.data import data_dir
        src = load_source(spec)
        weights = src.path if src.kind == "pt2" else (src.path / "model.safetensors") if src.path else None
        # the recipes calibrate on the data folder when there is one, else on the shipped fallback samples
        calib_data = None if calib_file else str(data_dir(required=False))
        kind, key = src.kind, {**common, "spec": spec, "weights": digest(weights), "calib_file": digest(calib_file),
                               "calib_data": calib_data, "calib": calib, "seq_len": seq_len, "version": 3}
        make = lambda: lower_source(src, calib, seq_len, calib_file)   # noqa: E731
    d = build_dir() / "deploy" / config_hash(key)
    cached = d / "graph.pkl"
    if cached.is_file() and not force:
        graph = pickle.loads(cached.read_bytes())
    else:
        graph = make()
        d.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(pickle.dumps(graph))
    sched, plan, fw = deploy_graph(graph, b, d, schedule, force=force)
    name = name or (Path(spec).name if Path(spec).is_dir() or kind == "tflite" else spec)
    return BuiltModel(name, kind, b.id, graph, sched, plan, d / "src", fw)

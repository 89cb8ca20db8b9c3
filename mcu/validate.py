"""Layer-by-layer validation on the device: every op's output read back from the board and compared
with the host int8 reference (bit for bit, in LSB) and with the float model (cosine, SNR).

The device runs a *tap build* of the deployed model (mcu.build.firmware_variant(built, taps=True)): the same schedule and
arena plan, with the inference cut into segments that each end with one op's output complete in the
arena (mcu.codegen.segments). The host steps the board through the segments (STEP) and reads each
op's output bytes back (PEEK) before the next segment can overwrite them. The host int8 reference
runs the same schedule in the same arena layout (mcu.execute.run) and captures the same bytes after
the same call. The float model is the captured ATen graph; the lowering records which node's value
each int8 tensor holds (graph.meta["node_of"]), so only ops whose output is one node's value get a
float comparison.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from base.errors import TinyshieldError
from mcu.build import float_input
from mcu.codegen import Segment, segments
from mcu.graph import DTYPES


@dataclass
class OpCheck:
    segment: int
    op: str
    kind: str                     # the graph op's kind (fully_connected, layernorm, ...)
    tensor: str                   # the tapped output tensor
    nbytes: int
    max_lsb: int                  # max |device - host int8 reference| over all inputs, in LSB
    mismatched: int               # elements that differ, summed over all inputs
    cosine: float | None          # device (dequantised) vs the float model: worst input; None = no float node
    snr_db: float | None          # 10 log10(|float|^2 / |float - device|^2): worst input
    float_node: str | None        # the ATen node the tensor stands for
    where: str                    # the user's source line of the op, if known
    stack_bytes: int              # deepest stack high-water of this segment on the device

    @property
    def diverges(self) -> bool:
        return self.max_lsb > 0


@dataclass
class Validation:
    model: str
    board: str
    firmware: str
    inputs: int
    ops: list[OpCheck]
    output_equal: bool            # final outputs of the tap build equal the host reference bit for bit
    float_note: str               # why float comparisons are missing, or ""
    seconds: float
    first_divergent: int | None = None   # index into ops
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.first_divergent is None and self.output_equal

    def divergent(self) -> OpCheck | None:
        return None if self.first_divergent is None else self.ops[self.first_divergent]

    def to_json(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        d["first_divergent_op"] = self.divergent().op if self.divergent() else None
        return d


# ---------------------------------------------------------------- the three sources of each tensor

def _typed(raw: bytes | np.ndarray, dtype: str) -> np.ndarray:
    return np.frombuffer(bytes(raw), dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).astype(DTYPES[dtype])


def host_taps(built, segs: list[Segment], q: np.ndarray) -> dict[str, np.ndarray]:
    """The host int8 reference's bytes of every tapped tensor, taken right after its segment's last call."""
    from mcu.execute import run

    sched = built.schedule
    g = sched.graph
    at = {sg.stop - 1: sg.taps for sg in segs}
    got: dict[str, np.ndarray] = {}

    def after(i, mem):
        for t in at.get(i, ()):
            got[t] = _typed(mem[t][:g.tensors[t].nbytes].copy(), g.tensors[t].dtype)

    run(sched, {g.inputs[0]: q}, built.plan, after_call=after)
    return got


def device_taps(dev, built, segs: list[Segment], q: np.ndarray) -> tuple[dict[str, np.ndarray], list[int], np.ndarray]:
    """Step the tap build through every segment on the board, reading each tapped tensor back.
    -> (tensor bytes, stack high-water per segment, final output)."""
    g = built.graph
    if dev.info.arena_bytes != built.plan.arena_bytes:
        raise TinyshieldError(f"the board's arena is {dev.info.arena_bytes} B, the plan's {built.plan.arena_bytes} B: "
                              "it runs firmware of another build — let tinyshield validate boot its own tap build")
    dev.link.upload(dev.check_input(q))
    got, stacks = {}, []
    for k, sg in enumerate(segs):
        stacks.append(dev.link.step(k))
        for t in sg.taps:
            tt = g.tensors[t]
            got[t] = _typed(dev.link.peek(built.plan.offsets[t], tt.nbytes), tt.dtype)
    out = _typed(dev.link.download(dev.info.output_bytes), g.tensors[g.outputs[0]].dtype)
    return got, stacks, out


def float_model(spec: str, graph):
    """The captured float graph the int8 graph was lowered from (a .pt2's own program; a recipe's module
    captured again exactly as lower_module captures it) -> (Captured, note). None + the reason when the
    graph's tensors cannot be matched to its nodes."""
    from edge.capture import capture
    from mcu.build import load_source
    from mcu.from_aten import capturable

    node_of = graph.meta.get("node_of")
    if not node_of:
        return None, "the int8 graph records no float node per tensor: rebuild it (tinyshield build MODEL --force)"
    src = load_source(spec)
    if src.captured is not None:
        cap = src.captured
    else:
        model, _ = capturable(src.model)
        cap = capture(model, (float_input(graph, _example(graph)),))
    names = {n.name for n in cap.graph.nodes}
    missing = sorted({v[0] for v in node_of.values()} - names)
    if missing:
        return None, (f"the captured float graph lacks node(s) {', '.join(missing[:3])}: the model changed since "
                      "the int8 graph was built — rebuild (tinyshield build MODEL --force)")
    return cap, ""


def _example(graph) -> np.ndarray:
    t = graph.tensors[graph.inputs[0]]
    if graph.meta.get("input_kind") == "ids":
        return np.zeros(t.shape, dtype=np.int64)
    return np.zeros(graph.meta["input_shape"], dtype=np.float32)


def float_values(cap, graph, x, wanted: set[str]) -> dict[str, np.ndarray]:
    import torch
    vals = {}

    def see(node, value):
        if node.name in wanted and isinstance(value, torch.Tensor):
            vals[node.name] = value.detach().double().numpy()

    with torch.no_grad():
        cap.run(float_input(graph, x), observe=see)
    return vals


def compare_float(dev: np.ndarray, f: np.ndarray, layout) -> tuple[float, float] | None:
    """(cosine, SNR dB) of a device tensor against its float node's value; layout is graph.meta
    ["node_of"][tensor] = (node, shape, strides in elements, scale, zero point)."""
    _, shape, strides, scale, zp = layout
    if f.size != int(np.prod(shape)):
        return None
    deq = (dev.astype(np.float64) - zp) * scale
    d = np.lib.stride_tricks.as_strided(deq, shape=shape, strides=[s * deq.itemsize for s in strides])
    fv = f.reshape(shape)
    a, b = fv.reshape(-1), np.ascontiguousarray(d).reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    err = float(np.sum((a - b) ** 2))
    snr = float(10 * np.log10(np.sum(a ** 2) / err)) if err > 0 else float("inf")
    return cos, snr


# ---------------------------------------------------------------- the whole check

def validate(built, dev, xs, spec: str | None = None, progress_bar=None) -> Validation:
    """Run each raw input of `xs` on the tap-build board `dev`, compare every op's output with the host
    int8 reference of `built` (its schedule and plan) and, given the model `spec`, with the float model."""
    t0 = time.monotonic()
    g = built.graph
    segs = segments(built.schedule)
    kinds = {op.name: op.kind for op in g.ops}
    where = g.meta.get("where", {})
    node_of = g.meta.get("node_of", {})
    cap, note = (float_model(spec, g) if spec is not None else (None, "no model given for the float comparison"))
    wanted = {node_of[t][0] for sg in segs for t in sg.taps if t in node_of}

    rows: dict[str, dict] = {}
    stack_max = [0] * len(segs)
    output_equal = True
    task = progress_bar.add_task(f"validate on {dev.info.board}", total=len(xs), info="") if progress_bar else None
    for x in xs:
        q = built.quantise_input(x)
        ref = host_taps(built, segs, q)
        got, stacks, out = device_taps(dev, built, segs, q)
        want_out = built.reference(q)
        output_equal &= bool(np.array_equal(out.reshape(-1), want_out.reshape(-1)))
        fv = float_values(cap, g, x, wanted) if cap is not None else {}
        for k, sg in enumerate(segs):
            stack_max[k] = max(stack_max[k], stacks[k])
            for t in sg.taps:
                r = rows.setdefault(t, {"max_lsb": 0, "mismatched": 0, "cos": None, "snr": None})
                diff = np.abs(got[t].astype(np.int64) - ref[t].astype(np.int64))
                r["max_lsb"] = max(r["max_lsb"], int(diff.max(initial=0)))
                r["mismatched"] += int(np.count_nonzero(diff))
                lay = node_of.get(t)
                if lay is not None and lay[0] in fv:
                    c = compare_float(got[t], fv[lay[0]], lay)
                    if c is not None:
                        r["cos"] = c[0] if r["cos"] is None else min(r["cos"], c[0])
                        r["snr"] = c[1] if r["snr"] is None else min(r["snr"], c[1])
        if progress_bar:
            progress_bar.update(task, advance=1)
    ops = []
    for k, sg in enumerate(segs):
        for t in sg.taps:
            r = rows[t]
            lay = node_of.get(t)
            ops.append(OpCheck(k, sg.op, kinds.get(sg.op, "?"), t, g.tensors[t].nbytes, r["max_lsb"], r["mismatched"],
                               r["cos"], r["snr"], lay[0] if lay and r["cos"] is not None else None,
                               where.get(sg.op, ""), stack_max[k]))
    first = next((i for i, o in enumerate(ops) if o.diverges), None)
    if cap is not None and not any(o.cosine is not None for o in ops):
        note = "no tapped tensor holds exactly one float node's value"
    return Validation(built.name, dev.info.board, str(built.firmware.elf), len(xs), ops, output_equal, note,
                      time.monotonic() - t0, first)


# ---------------------------------------------------------------- presentation

def render(v: Validation, console=None, max_rows: int = 400) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"{v.model} on {v.board}: every op vs the host int8 reference and the float model "
                    f"({v.inputs} input{'s' if v.inputs != 1 else ''}; cosine/SNR: worst input)")
    for c, j in [("#", "right"), ("op", "left"), ("kind", "left"), ("bytes", "right"), ("max |Δ| LSB", "right"),
                 ("≠ elems", "right"), ("cos vs float", "right"), ("SNR dB", "right"), ("stack B", "right")]:
        t.add_column(c, justify=j, overflow="fold", min_width=24 if c == "op" else None)
    for i, o in enumerate(v.ops[:max_rows]):
        style = "bold red" if i == v.first_divergent else ("red" if o.diverges else None)
        t.add_row(str(o.segment), o.op, o.kind, f"{o.nbytes:,}", str(o.max_lsb), f"{o.mismatched:,}",
                  "—" if o.cosine is None else f"{o.cosine:.4f}",
                  "—" if o.snr_db is None else ("inf" if o.snr_db == float("inf") else f"{o.snr_db:.1f}"),
                  f"{o.stack_bytes:,}", style=style)
    console.print(t)
    if v.float_note:
        console.print(f"float comparison: {v.float_note}")
    d = v.divergent()
    if d is not None:
        console.print(f"[bold red]first divergent op:[/] {d.op} ({d.kind}, segment {d.segment}): max |Δ| {d.max_lsb} LSB "
                      f"on {d.mismatched:,} elements" + (f"\n  at {d.where}" if d.where else ""))
    elif not v.output_equal:
        console.print("[bold red]the final output differs from the host reference[/] although every tapped op agrees")
    else:
        console.print(f"[green]device = host int8 reference[/] for every op on all {v.inputs} inputs "
                      f"({len(v.ops)} ops, {v.seconds:.1f} s)")

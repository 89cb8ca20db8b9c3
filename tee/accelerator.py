"""The untrusted accelerator: its own process, all cores, only the transformed linear layers.

It never receives plaintext: it holds the accelerator model of a bundle (plain, ShadowNet-obfuscated or
int8 field weights) and answers `matmul` requests. It records what it receives (the attacker's view,
for the audit) and can be made malicious (`tamper`) to test the enclave's checks.
"""
from __future__ import annotations

import json
import time
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from base.errors import TinyshieldError
from tee import dma, fieldgemm
from tee.fieldmath import P
from tee.link import spinner
from tee.messages import Message, code, recv, send

ATTACKS = ("flip", "perturb", "swap", "replay")


def tamper(attack: str, y: np.ndarray, previous: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """A malicious answer derived from the honest one `y` (and the last answer for the same layer)."""
    y = y.copy()
    i, j = rng.integers(y.shape[0]), rng.integers(y.shape[1])
    if attack == "flip":            # one bit of one entry (low 23 bits: stays a plausible field element)
        bits = y.view(np.uint32)
        bits[i, j] ^= np.uint32(1 << int(rng.integers(23)))
    elif attack == "perturb":       # the smallest possible change of one entry
        if y.dtype == np.uint32:
            y[i, j] = (int(y[i, j]) + 1) % P
        else:
            y[i, j] = np.nextafter(y[i, j], np.float32(np.inf))
    elif attack == "swap":          # two output channels exchanged
        a, b = rng.choice(y.shape[1], 2, replace=False)
        y[:, [a, b]] = y[:, [b, a]]
    elif attack == "replay":        # a stale answer from an earlier call
        if previous is not None and previous.shape == y.shape:
            y = previous.copy()
    else:
        raise TinyshieldError(f"unknown attack {attack!r}: {', '.join(ATTACKS)}")
    return y


class Backend:
    """Runs one layer as the bundle's mode says (tee.modes: its `backend`): "float", fp32 x @ W^T (plain,
    shadownet), or "field", exact x~ w_q^T mod p on int8 digit planes (blinded, sliced)."""

    def __init__(self, accel_dir: Path, mode: str, kind: str, layers: dict):
        from tee import modes
        self.mode, self.kind = mode, kind
        self.field = modes.get(mode).backend == "field"
        self.layers = layers
        self.choice: fieldgemm.Choice | None = None
        if kind == "litert" and not self.field:
            from tee.litert_backend import LayerRunner
            self.runner = LayerRunner(accel_dir, layers, torch.get_num_threads())
            return
        self.kind = "torch"
        w = load_file(str(accel_dir / "weights.safetensors"))
        # field: w_q^T as int8 for the exact digit GEMM, on the kernel this CPU passed the self-test with
        if self.field:
            self.choice = fieldgemm.chosen()
            self.w = {k: fieldgemm.FieldGemm(torch.from_numpy(v), self.choice.kernel) for k, v in w.items()}
        else:
            self.w = {k: torch.from_numpy(v).to(torch.float32) for k, v in w.items()}

    @property
    def out_dtype(self):
        return np.uint32 if self.field else np.float32

    def out_rows(self, rows: int) -> int:
        """Rows of the answer to an input of `rows` rows (blinded inputs are three digit planes)."""
        return rows // 3 if self.field else rows

    def __call__(self, layer: str, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The layer's answer; blinded writes it straight into `out` (the shared buffer) when given."""
        if layer not in self.layers:
            raise TinyshieldError(f"unknown layer {layer!r}")
        rows, k, m = self.layers[layer]
        if x.ndim != 2 or x.shape[1] != k:
            raise TinyshieldError(f"{layer}: input shape {x.shape}, expected (rows, {k})")
        if self.field:
            if x.dtype != np.uint8 or x.shape[0] % 3:
                raise TinyshieldError(f"{self.mode} mode takes three digit planes (uint8, 3 x rows)")
            return self.w[layer].planes(x, out)
        if x.dtype != np.float32:
            raise TinyshieldError("this mode takes float32 activations")
        if self.kind == "litert":
            return self.runner(layer, x)
        return (torch.from_numpy(x) @ self.w[layer]).numpy()


def main(enclave_conn, host_conn, bundle_dir: str, backend: str, threads: int, record: bool,
         attack: str | None, attack_after: int, seed: int | None, buffer_names: tuple[str, str] | None = None,
         poll_s: float = 0.0) -> None:
    torch.set_num_threads(threads)
    buffers = tuple(dma.attach(n) for n in buffer_names) if buffer_names else None
    slots = [dma.Slots(b) for b in buffers] if buffers else None
    header = json.loads((Path(bundle_dir) / "bundle.json").read_text())
    layers = header["accelerator"]["layers"]
    run, broken = None, None
    try:
        run = Backend(Path(bundle_dir) / "accelerator", header["mode"], backend, layers) if layers else None
    except TinyshieldError as e:     # e.g. a forced GEMM kernel that is not exact here: say so to every request
        broken = f"the accelerator cannot serve this bundle: {e}"
    rng = np.random.default_rng(seed)
    transcript: list[tuple[str, np.ndarray]] = []
    last: dict[str, np.ndarray] = {}
    calls, busy = 0, 0.0
    conns = [enclave_conn, host_conn]
    spin = spinner(enclave_conn)
    polling = False   # between an inference's requests only: the enclave says "idle" after its last one
    while True:
        # the enclave's next request is usually moments away; when it comes, read it without a select over both pipes
        ready = [enclave_conn] if polling and spin(time.perf_counter() + poll_s) else wait(conns)
        for conn in ready:
            try:
                msg = recv(conn)
            except TinyshieldError:
                return
            if msg.kind == "idle":
                polling = False
                continue
            if msg.kind in ("matmul", "matmul_dma"):
                t_recv = time.perf_counter()
                polling = poll_s > 0
                f = msg.fields
                layer = f["layer"]
                try:
                    if run is None:
                        raise TinyshieldError(broken or "this bundle outsources no layers")
                    if msg.kind == "matmul":
                        x, target = msg.arrays[0], None
                    else:
                        if not slots:
                            raise TinyshieldError("no shared buffers were set up")
                        if layer not in layers:
                            raise TinyshieldError(f"bad request: layer {layer!r}")
                        x = slots[0](f["slot"], f["dtype"], f["rows"], f["cols"])
                        target = slots[1](f["slot"], code(run.out_dtype), run.out_rows(f["rows"]), layers[layer][2])
                    t, c = time.perf_counter(), time.process_time()
                    y = run(layer, x, target)
                    seconds, cpu = time.perf_counter() - t, time.process_time() - c   # cpu: summed over threads
                    if attack and calls >= attack_after:
                        y = tamper(attack, y, last.get(layer), rng)
                    if target is not None and y is not target:
                        target[...] = y
                except TinyshieldError as e:
                    send(conn, Message("error", {"message": str(e)}))
                    continue
                if attack:
                    last[layer] = y.copy()
                calls += 1
                busy += seconds
                if record:
                    transcript.append((layer, x.copy()))
                timing = {"seq": f["seq"], "seconds": seconds, "cpu": cpu, "t_recv": t_recv}
                if msg.kind == "matmul":
                    send(conn, Message("result", timing | {"t_send": time.perf_counter()}, [y]))
                else:
                    send(conn, Message("result_dma", timing | {"t_send": time.perf_counter(), "dtype": code(y.dtype),
                                                               "rows": y.shape[0], "cols": y.shape[1]}))
            elif msg.kind == "transcript":
                send(conn, Message("transcript_data", {"entries": json.dumps([n for n, _ in transcript])},
                                   [a for _, a in transcript]))
            elif msg.kind == "stats":
                choice = run.choice if run else None
                send(conn, Message("stats_data", {"calls": calls, "seconds": busy,
                                                  "backend": run.kind if run else "none",
                                                  "kernel": choice.name if choice else "none",
                                                  "kernel_note": choice.note() if choice else broken or ""}))
            elif msg.kind == "reset_stats":
                calls, busy = 0, 0.0
                transcript.clear()
                send(conn, Message("ok"))
            elif msg.kind == "record":
                record = bool(msg.fields["on"])
                send(conn, Message("ok"))
            elif msg.kind == "stop":
                send(conn, Message("ok"))
                return
            else:
                send(conn, Message("error", {"message": f"the accelerator does not serve {msg.kind!r}"}))

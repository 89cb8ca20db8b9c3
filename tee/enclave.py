"""The enclave: its own process, one thread, the only place holding plaintext weights and inputs.

It unseals the bundle with a key derived from the device root key and its own measurement, answers
attestation requests with a signed quote, decrypts inputs from the attested channel, runs the
non-linear layers itself and the linear ones through the mode's `lin` (which talks to the untrusted
accelerator), and returns the encrypted output with a timing breakdown.
"""
from __future__ import annotations

import json
import secrets as pysecrets
import time
from pathlib import Path

import numpy as np
import torch

from edge.errors import TinyshieldError
from tee import blinded, dma, program, shadownet
from tee.attestation import Channel, make_quote, new_keypair
from tee.messages import Message, recv, send
from tee.sealing import device_root_key, measurement, seal_key


class AcceleratorLink:
    """The enclave's side of the accelerator connection; checks every answer's sequence number, shape and dtype."""

    def __init__(self, conn, out_dims: dict[str, int], buffers=None):
        self.conn, self.out_dims, self.seq = conn, out_dims, 0
        self.buffers = buffers     # (outbound, inbound) shared buffers, or None to send data over the pipe
        self.staged = None         # the outbound view handed out by `outbound`, already holding the request
        self.reset()

    def reset(self):
        self.wait = self.accel = self.accel_cpu = 0.0
        self.calls = 0

    def outbound(self, dtype, shape: tuple[int, int]) -> np.ndarray:
        """Where to build the next request: a view of the outbound shared buffer (no copy later), or a new array."""
        if self.buffers is None:
            return np.empty(shape, dtype)
        self.staged = dma.view(self.buffers[0], dma.code(np.dtype(dtype)), *shape)
        return self.staged

    def matmul(self, layer: str, x: np.ndarray, copy: bool = True) -> np.ndarray:
        """The accelerator's answer for `x`. With copy=False the answer may be a view of untrusted shared memory:
        the caller must read each entry once (blinded.unblind does) or copy it before checking it."""
        if self.conn is None:
            raise TinyshieldError("this enclave has no accelerator connection")
        self.seq += 1
        t = time.perf_counter()
        if self.buffers is None:
            send(self.conn, Message("matmul", {"layer": layer, "seq": self.seq}, [x]))
            reply = recv(self.conn, "result")
            y = reply.arrays[0]
        else:
            if x is not self.staged:
                dma.view(self.buffers[0], dma.code(x.dtype), *x.shape)[...] = x
            self.staged = None
            send(self.conn, Message("matmul_dma", {"layer": layer, "seq": self.seq, "dtype": dma.code(x.dtype),
                                                   "rows": x.shape[0], "cols": x.shape[1]}))
            reply = recv(self.conn, "result_dma")
            f = reply.fields
            y = dma.view(self.buffers[1], f["dtype"], f["rows"], f["cols"])
            y = y.copy() if copy else y
        self.wait += time.perf_counter() - t
        self.calls += 1
        if reply.fields["seq"] != self.seq:
            raise TinyshieldError(f"accelerator answered request {reply.fields['seq']}, expected {self.seq}")
        if y.shape != (x.shape[0], self.out_dims[layer]) or y.dtype != x.dtype:
            raise TinyshieldError(f"accelerator returned a malformed result for {layer}: {y.dtype} {y.shape}")
        self.accel += max(0.0, reply.fields["seconds"])
        self.accel_cpu += max(0.0, reply.fields["cpu"])
        return y


class Enclave:
    def __init__(self, bundle_dir: str | Path, accel_conn=None, buffers=None):
        self.dir = Path(bundle_dir)
        header = json.loads((self.dir / "bundle.json").read_text())
        self.config = header["enclave_config"]
        self.mode = self.config["mode"]
        self.root = device_root_key()
        self.meas = measurement(self.config)          # the enclave measures its own code + config
        self.key = seal_key(self.root, self.meas)
        from tee.bundle import read_sealed
        sealed = read_sealed(self.dir / "enclave.sealed", self.key, b"bundle\0" + self.meas)
        self.model = self._build_model(sealed)
        self.params = program.linears(self.model)
        self.link = AcceleratorLink(accel_conn, self._out_dims(sealed), buffers)
        self.channel: Channel | None = None
        self.offline = 0.0
        self.prefetched: dict[str, np.ndarray] | None = None
        if self.mode == "shadownet":
            self.shadow = {n: (shadownet.ShadowLayer(obf=None, perm=sealed[f"sn.{n}.perm"], scale=sealed[f"sn.{n}.scale"],
                                                     fake=sealed[f"sn.{n}.fake"].astype(bool)),
                               sealed[f"sn.{n}.masks"], sealed[f"sn.{n}.mask_out"]) for n in self.params}
        if self.mode == "blinded":
            self.blind = {n: blinded.BlindLayer(w_q=sealed[f"bl.{n}.w_q"], w_scale=sealed[f"bl.{n}.w_scale"],
                                                fx=int(sealed[f"bl.{n}.fx"][0]), bias=self.params[n][1])
                          for n in self.params}

    def _build_model(self, sealed):
        from edge.models.registry import build
        kind = "bert" if self.config["kind"] == "minilm" else self.config["kind"]
        model = build(kind, self.config["model"])
        state = {k[len("model."):]: torch.from_numpy(v) for k, v in sealed.items() if k.startswith("model.")}
        model.load_state_dict(state)
        return model.eval()

    def _out_dims(self, sealed) -> dict[str, int]:
        if self.mode == "shadownet":
            return {n: len(sealed[f"sn.{n}.fake"]) for n in program.linears(self.model)}
        return {n: w.shape[0] for n, (w, _) in program.linears(self.model).items()}

    # ---- the modes: what a linear layer does --------------------------------------------------------
    def lin(self):
        p = {k: (torch.from_numpy(w), torch.from_numpy(b)) for k, (w, b) in self.params.items()}
        if self.mode == "enclave-only":
            return program.plain_lin(self.params)
        if self.mode == "plain":
            return lambda name, x: torch.from_numpy(self.link.matmul(name, x.contiguous().numpy()).copy()) + p[name][1]
        if self.mode == "shadownet":
            def lin(name, x):
                layer, masks, mask_out = self.shadow[name]
                j = pysecrets.randbelow(len(masks))
                y = self.link.matmul(name, (x.numpy() + masks[j]).astype(np.float32))
                return torch.from_numpy(shadownet.restore(y, mask_out[j], layer, self.params[name][1]))
            return lin
        pad = self.next_pad()

        def lin(name, x):
            layer = self.blind[name]
            r = pad[f"{name}.r"]
            if r.shape[0] != x.shape[0]:
                raise TinyshieldError(f"{name}: input has {x.shape[0]} rows, pads were made for {r.shape[0]}")
            x_tilde, rhs = blinded.blind(x, layer, r, pad[f"{name}.v"], out=self.link.outbound(np.uint32, r.shape))
            y = blinded.unblind(self.link.matmul(name, x_tilde, copy=False), pad[f"{name}.u"], pad[f"{name}.s"],
                                rhs, layer)
            if y is None:
                raise TinyshieldError(f"integrity check failed on {name}: the accelerator returned a wrong result "
                                      "(Freivalds); inference aborted")
            return y
        return lin

    def prefetch(self) -> None:
        """Between requests: unseal the next pad now, so the next inference does not wait for it."""
        if self.mode == "blinded" and self.prefetched is None:
            self.prefetched = self._take_pad(allow_make=False)

    def next_pad(self) -> dict[str, np.ndarray]:
        pad, self.prefetched = self.prefetched, None
        return pad if pad is not None else self._take_pad(allow_make=True)

    def _take_pad(self, allow_make: bool) -> dict[str, np.ndarray] | None:
        """Take (and delete) the next one-time pad; with none left, make one here (slow, counted as offline)."""
        from tee.bundle import pad_aad, read_sealed
        files = sorted((self.dir / "pads").glob("*.sealed"))
        if files:
            f = files[0]
            pad = read_sealed(f, self.key, pad_aad(int(f.stem), self.meas))
            f.unlink()   # one use only
            return pad
        if not allow_make:
            return None
        t = time.perf_counter()
        pad = blinded.make_pad(self.blind, self.config["rows"])
        self.offline += time.perf_counter() - t
        return pad

    # ---- requests -----------------------------------------------------------------------------------
    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        spec = self.config["input"]
        if set(inputs) != set(spec):
            raise TinyshieldError(f"inputs {sorted(inputs)} do not match the bundle's {sorted(spec)}")
        for k, shape in spec.items():
            if list(inputs[k].shape) != shape:
                raise TinyshieldError(f"input {k} has shape {list(inputs[k].shape)}, the bundle expects {shape}")
        if "input_ids" in inputs:
            ids, vocab = inputs["input_ids"], self.config["model"]["vocab_size"]
            if ids.min(initial=0) < 0 or ids.max(initial=0) >= vocab:
                raise TinyshieldError(f"token ids must be in 0..{vocab - 1}")
            if not np.isin(inputs["attention_mask"], (0, 1)).all():
                raise TinyshieldError("attention_mask must hold only 0 and 1")
        if "image" in inputs and not np.isfinite(inputs["image"]).all():
            raise TinyshieldError("image holds NaN or infinite values")

    def infer(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
        self.check_inputs(inputs)
        self.link.reset()
        self.offline = 0.0
        t0, c0 = time.perf_counter(), time.thread_time()
        lin = self.lin()
        t_pad = time.perf_counter() - t0
        y = program.forward(self.model, inputs, lin)
        total = time.perf_counter() - t0
        # CPU seconds are far less sensitive than wall time to other work on a shared machine
        timings = {"enclave_cpu_s": time.thread_time() - c0 - self.offline, "accelerator_cpu_s": self.link.accel_cpu,
                   "enclave_s": total - self.link.wait - self.offline, "accelerator_s": self.link.accel,
                   "transfer_s": self.link.wait - self.link.accel, "pad_s": t_pad - self.offline,
                   "offline_s": self.offline, "calls": self.link.calls, "total_s": total}
        return y.astype(np.float32), timings

    def handle(self, msg: Message) -> Message:
        if msg.kind == "attest":
            nonce, client_key = bytes.fromhex(msg.fields["nonce"]), bytes.fromhex(msg.fields["client_key"])
            own, own_pub = new_keypair()
            q = make_quote(self.root, self.meas, nonce, client_key, own_pub)
            self.channel = Channel(own, client_key, q.body(), initiator=False)
            return Message("quote", {"measurement": q.measurement.hex(), "nonce": q.nonce.hex(),
                                     "enclave_key": own_pub.hex(), "signature": q.signature.hex()})
        if msg.kind == "infer":
            if self.channel is None:
                raise TinyshieldError("no attested channel: attest before sending inputs")
            from tee.messages import decode, encode
            inner = decode(bytearray(self.channel.decrypt(msg.arrays[0].tobytes(), msg.fields["counter"])), "inputs")
            names = inner.fields["names"].split(",")
            if len(names) != len(inner.arrays):
                raise TinyshieldError("inputs message names and arrays differ in number")
            y, timings = self.infer(dict(zip(names, inner.arrays)))
            blob, n = self.channel.encrypt(encode(Message("outputs", {}, [y])))
            return Message("output", {"counter": n, "timings": json.dumps(timings)},
                           [np.frombuffer(blob, dtype=np.uint8)])
        raise TinyshieldError(f"the enclave does not serve {msg.kind!r} requests")


def main(client_conn, accel_conn, bundle_dir: str, buffer_names: tuple[str, str] | None = None) -> None:
    """Process entry point (spawned with one thread)."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    buffers = tuple(dma.attach(n) for n in buffer_names) if buffer_names else None
    try:
        enclave, failure = Enclave(bundle_dir, accel_conn, buffers), None
    except TinyshieldError as e:
        enclave, failure = None, str(e)
    while True:
        try:
            msg = recv(client_conn)
        except TinyshieldError:
            return
        if msg.kind == "stop":
            send(client_conn, Message("ok"))
            return
        try:
            if enclave is None:
                raise TinyshieldError(failure)
            reply = enclave.handle(msg)
        except TinyshieldError as e:
            reply = Message("error", {"message": str(e)})
        send(client_conn, reply)
        if enclave is not None and msg.kind in ("attest", "infer"):
            try:
                enclave.prefetch()
            except TinyshieldError:
                pass   # a bad pad file is reported when the next inference needs it

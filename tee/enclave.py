"""The enclave: its own process, one thread, the only place holding plaintext weights and inputs.

It unseals the bundle with a key derived from the device root key and its own measurement, answers
attestation requests with a signed quote, decrypts inputs from the attested channel, runs the
non-linear layers itself and the linear ones through the mode's `lin` (which talks to the untrusted
accelerator), and returns the encrypted output with a timing breakdown.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from base.errors import TinyshieldError
from tee import dma, modes, program
from tee.attestation import Channel, make_quote, new_keypair
from tee.link import POLL_S, AcceleratorLink
from tee.messages import Message, recv, send
from tee.sealing import device_root_key, measurement, seal_key


class Enclave:
    def __init__(self, bundle_dir: str | Path, accel_conn=None, buffers=None, overlap: bool = False):
        self.dir = Path(bundle_dir)
        # overlap: the encoder's rows go out in dma.SLOTS parts, so the enclave works on one while the accelerator
        # computes another, and each side polls for the other's messages; without it the two take turns
        self.chunks = dma.SLOTS if overlap else 1
        header = json.loads((self.dir / "bundle.json").read_text())
        self.config = header["enclave_config"]
        self.mode = modes.get(self.config["mode"])
        self.root = device_root_key()
        self.meas = measurement(self.config)          # the enclave measures its own code + config
        self.key = seal_key(self.root, self.meas)
        from tee.bundle import read_sealed
        sealed = read_sealed(self.dir / "enclave.sealed", self.key, b"bundle\0" + self.meas)
        # the forward pass is the model's own, captured here from the sealed config and weights (or the sealed .pt2)
        from tee.bundle import captured, load_pt2
        if self.config["kind"] == "pt2":
            self.model, self.prog = None, load_pt2(sealed["pt2"].tobytes())
        else:
            self.model = self._build_model(sealed)
            self.prog = captured(self.model, self.config["input"], self.mode.outsourced(self.model))
        self.params = program.linears(self.prog)
        self.side = self.mode.enclave(self, sealed)     # the mode's state: its linear layer
        self.link = AcceleratorLink(accel_conn, self.side.out_dims, buffers, POLL_S if overlap else 0.0)
        self.channel: Channel | None = None
        self.offline = 0.0
        self.prefetched: dict[str, np.ndarray] | None = None

    @property
    def blind(self) -> dict:
        """Field modes: the layers' fixed-point secrets (tee.blinded.BlindLayer), for the owner's reference."""
        return self.side.layers

    def _build_model(self, sealed):
        from edge.models.registry import build
        kind = "bert" if self.config["kind"] == "minilm" else self.config["kind"]
        model = build(kind, self.config["model"])
        state = {k[len("model."):]: torch.from_numpy(v) for k, v in sealed.items() if k.startswith("model.")}
        from edge.models.bert import served
        model = served(model.eval())
        model.load_state_dict(state)
        return model

    def submitter(self) -> program.Submit:
        """This mode's linear layer as `submit(name, x, rows) -> wait` (tee.program.pipelined): the request
        leaves at once, the enclave's check and restoration run when the result is waited for."""
        return self.side.submitter(self.next_pad() if self.mode.pads else None)

    def prefetch(self) -> None:
        """Between requests: unseal the next pad now, so the next inference does not wait for it."""
        if self.mode.pads and self.prefetched is None:
            self.prefetched = self._take_pad(allow_make=False)

    def next_pad(self) -> dict[str, np.ndarray]:
        pad, self.prefetched = self.prefetched, None
        return pad if pad is not None else self._take_pad(allow_make=True)

    def _take_pad(self, allow_make: bool) -> dict[str, np.ndarray] | None:
        """Take (and delete) the next one-time pad; with none left, make one here (slow, counted as offline)."""
        from tee.bundle import pad_aad, read_sealed
        for f in sorted((self.dir / "pads").glob("*.sealed")):
            # claim the file by renaming it (atomic): two enclaves on one bundle never take the same pad
            claimed = f.with_name(f"{f.stem}.taken-{os.getpid()}")
            try:
                os.rename(f, claimed)
            except FileNotFoundError:
                continue
            try:
                return read_sealed(claimed, self.key, pad_aad(int(f.stem), self.meas))
            finally:
                claimed.unlink()   # one use only, readable or not
        if not allow_make:
            return None
        t = time.perf_counter()
        pad = self.side.make_pad()
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
        if "input_ids" in inputs and "vocab_size" in self.config["model"]:
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
        submit = self.submitter()
        t_pad = time.perf_counter() - t0
        chunks = self.chunks if self.mode.outsources else 1
        try:
            y = program.pipelined(self.prog, inputs, submit, chunks)
        finally:
            self.link.idle()
        total = time.perf_counter() - t0
        link = self.link
        enclave = total - link.blocked - self.offline
        # with overlap, CPU seconds include polling for answers (tee.link.spinner)
        timings = {"enclave_cpu_s": time.thread_time() - c0 - self.offline, "accelerator_cpu_s": link.accel_cpu,
                   "enclave_s": enclave, "accelerator_s": link.accel, "transfer_s": link.transfer,
                   # the work the two processes did at the same time (pipelining)
                   "overlap_s": enclave + link.accel + link.transfer - (total - self.offline),
                   "pad_s": t_pad - self.offline, "offline_s": self.offline, "calls": link.calls, "total_s": total}
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


def main(client_conn, accel_conn, bundle_dir: str, buffer_names: tuple[str, str] | None = None,
         overlap: bool = False) -> None:
    """Process entry point (spawned with one thread)."""
    torch.set_num_threads(program.ENCLAVE_THREADS)
    torch.set_grad_enabled(False)
    buffers = tuple(dma.attach(n) for n in buffer_names) if buffer_names else None
    try:
        enclave, failure = Enclave(bundle_dir, accel_conn, buffers, overlap), None
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
        if msg.kind == "ping":
            send(client_conn, Message("ok"))
            continue
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

"""The host side: start the enclave (1 thread) and the accelerator (all cores) as spawned processes,
attest the enclave, send encrypted inputs, collect outputs and the timing breakdown."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from base.errors import TinyshieldError
from edge.recipes import busy_cores
from tee import accelerator, dma, enclave
from tee.attestation import Channel, Quote, fresh_nonce, new_keypair, verify_quote
from tee.bundle import Bundle, load_header
from tee.link import POLL_S
from tee.messages import Message, decode, encode, recv, send
from tee.sealing import measurement

FREE_CORES_FOR_OVERLAP = 1.5   # the enclave and the accelerator each spin on a core of their own

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Spinning OpenMP workers are ruinous on a shared, oversubscribed machine (measured: 10x slower matmuls).
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


@contextmanager
def threads_env(n: int):
    """Spawned children read these at import time, before any torch.set_num_threads call."""
    old = {k: os.environ.get(k) for k in THREAD_VARS + tuple(PASSIVE)}
    os.environ.update({k: str(n) for k in THREAD_VARS})
    os.environ.update(PASSIVE)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Timing:
    total_s: float            # client wall time: request to decrypted answer
    enclave_s: float          # enclave compute (non-linears, masking, checks, restoration)
    accelerator_s: float      # accelerator compute
    transfer_s: float         # enclave <-> accelerator messages on their way (tee.link)
    overlap_s: float = 0.0    # enclave and accelerator working at the same time: enclave + accelerator + transfer - total
    pad_s: float = 0.0        # unsealing the one-time pad (blinded; part of enclave_s)
    offline_s: float = 0.0    # pads made on the fly when none were precomputed
    calls: int = 0
    enclave_cpu_s: float = 0.0      # CPU seconds of the enclave's one thread
    accelerator_cpu_s: float = 0.0  # CPU seconds of the accelerator, summed over its threads


class ProtectedSession:
    def __init__(self, bundle_dir, backend: str | None = None, record: bool = False, attack: str | None = None,
                 attack_after: int = 0, seed: int | None = None, accel_threads: int | None = None, attest: bool = True,
                 transport: str = "dma", overlap: bool | None = None):
        """overlap: pipeline the encoder's row parts and poll for messages instead of sleeping (tee.link) --
        faster where the enclave and the accelerator have cores of their own, slower where they share one
        (MiniLM L = 128 on a 2-core Xeon: 0.85x enclave-only idle, 3-4x with one core busy elsewhere);
        None: on when two cores are free now (edge.recipes.busy_cores)."""
        if overlap is None:
            overlap = (os.cpu_count() or 1) - busy_cores() >= FREE_CORES_FOR_OVERLAP
        self.bundle: Bundle = load_header(bundle_dir)
        self.backend = backend or self.bundle.header["accelerator"]["backend"]
        if self.backend not in ("torch", "litert"):
            raise TinyshieldError(f"unknown accelerator backend {self.backend!r}: torch or litert")
        if transport not in ("dma", "pipe"):
            raise TinyshieldError(f"unknown transport {transport!r}: dma (shared buffers) or pipe")
        layers = self.bundle.header["accelerator"]["layers"]
        self.buffers = []
        if transport == "dma" and layers:
            # one buffer each way; each of its slots as large as the largest layer's input or output (4-byte elements)
            size = max(rows * max(k, m) * 4 for rows, k, m in layers.values())
            self.buffers = [dma.create(size), dma.create(size)]
        names = tuple(b.name for b in self.buffers) or None
        ctx = mp.get_context("spawn")
        self.host_end, accel_host = ctx.Pipe()
        enc_accel, accel_enc = ctx.Pipe()
        self.client_end, enc_client = ctx.Pipe()
        threads = accel_threads or os.cpu_count() or 1
        with threads_env(threads):
            self.accel = ctx.Process(target=accelerator.main, name="tinyshield-accelerator", daemon=True,
                                     args=(accel_enc, accel_host, str(self.bundle.path), self.backend, threads,
                                           record, attack, attack_after, seed, names, POLL_S if overlap else 0.0))
            self.accel.start()
        with threads_env(1):
            self.enclave = ctx.Process(target=enclave.main, name="tinyshield-enclave", daemon=True,
                                       args=(enc_client, enc_accel, str(self.bundle.path), names,
                                             overlap))
            self.enclave.start()
        for c in (accel_host, enc_accel, accel_enc, enc_client):
            c.close()
        self.channel: Channel | None = None
        self.quote: Quote | None = None
        if attest:
            try:
                self.attest()
            except BaseException:
                self.close()     # stop both processes and free the shared buffers
                raise

    # ---- attestation ---------------------------------------------------------------------------------
    def request_quote(self, nonce: bytes, client_pub: bytes) -> Quote:
        send(self.client_end, Message("attest", {"nonce": nonce.hex(), "client_key": client_pub.hex()}))
        f = recv(self.client_end, "quote").fields
        return Quote(bytes.fromhex(f["measurement"]), bytes.fromhex(f["nonce"]), client_pub,
                     bytes.fromhex(f["enclave_key"]), bytes.fromhex(f["signature"]))

    def attest(self, quote: Quote | None = None) -> Quote:
        """Verify the enclave before any input leaves the client; `quote` lets tests inject a replayed one."""
        own, own_pub = new_keypair()
        nonce = fresh_nonce()
        fresh = self.request_quote(nonce, own_pub)
        q = quote or fresh
        expected = measurement(self.bundle.header["enclave_config"])   # computed from the code the client trusts
        verify_quote(q, bytes.fromhex(self.bundle.header["device_key"]), expected, nonce, own_pub)
        self.channel = Channel(own, q.enclave_key, q.body(), initiator=True)
        self.quote = q
        return q

    # ---- inference -----------------------------------------------------------------------------------
    def infer(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, Timing]:
        if self.channel is None:
            raise TinyshieldError("the enclave is not attested: call attest() first")
        names = sorted(inputs)
        # the wire carries float32 and int32: real-valued inputs (images, a .pt2's features) stay real
        arrays = [np.ascontiguousarray(inputs[n], dtype=np.float32 if np.issubdtype(np.asarray(inputs[n]).dtype,
                                                                                   np.floating) else np.int32)
                  for n in names]
        t = time.perf_counter()
        blob, n = self.channel.encrypt(encode(Message("inputs", {"names": ",".join(names)}, arrays)))
        send(self.client_end, Message("infer", {"counter": n}, [np.frombuffer(blob, dtype=np.uint8)]))
        reply = recv(self.client_end, "output")
        out = decode(self.channel.decrypt(reply.arrays[0].tobytes(), reply.fields["counter"]), "outputs").arrays[0]
        total = time.perf_counter() - t
        tm = json.loads(reply.fields["timings"])
        return out.copy(), Timing(total_s=total, enclave_s=tm["enclave_s"], accelerator_s=tm["accelerator_s"],
                                  transfer_s=tm["transfer_s"], overlap_s=tm["overlap_s"], pad_s=tm["pad_s"],
                                  offline_s=tm["offline_s"],
                                  calls=tm["calls"], enclave_cpu_s=tm["enclave_cpu_s"],
                                  accelerator_cpu_s=tm["accelerator_cpu_s"])

    def ready(self) -> None:
        """Wait until the enclave has finished its work between requests (unsealing the next blinded pad), so
        that work never overlaps a timed request of another session."""
        send(self.client_end, Message("ping"))
        recv(self.client_end, "ok")

    # ---- the untrusted side's view -------------------------------------------------------------------
    def transcript(self) -> list[tuple[str, np.ndarray]]:
        send(self.host_end, Message("transcript"))
        m = recv(self.host_end, "transcript_data")
        return list(zip(json.loads(m.fields["entries"]), m.arrays))

    def record(self, on: bool) -> None:
        """Switch the accelerator's transcript on or off (and clear it and the counters)."""
        send(self.host_end, Message("record", {"on": int(on)}))
        recv(self.host_end, "ok")
        send(self.host_end, Message("reset_stats"))
        recv(self.host_end, "ok")

    def accelerator_stats(self) -> dict:
        send(self.host_end, Message("stats"))
        return recv(self.host_end, "stats_data").fields

    def close(self) -> None:
        for conn, proc in ((self.client_end, self.enclave), (self.host_end, self.accel)):
            try:
                send(conn, Message("stop"))
                conn.recv_bytes() if conn.poll(5) else None
            except (OSError, EOFError, BrokenPipeError):
                pass
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            conn.close()
        for b in self.buffers:
            b.close()
            b.unlink()
        self.buffers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

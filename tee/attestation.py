"""Attestation and the client <-> enclave channel.

The device attestation key (Ed25519) is derived from the device root key; its public half is the
"certificate" a client trusts (written by `device_public_key()`). A quote signs
measurement || client nonce || client X25519 key || enclave X25519 key, so a verified quote proves
which code runs, that it is fresh (the nonce), and which key to encrypt inputs to.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from base.errors import TinyshieldError
from tee.sealing import derive

QUOTE_LABEL = b"tinyshield-quote-v1\0"


def _raw(pub) -> bytes:
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def attestation_key(root: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(derive(root, b"attest"))


def device_public_key(root: bytes) -> bytes:
    return _raw(attestation_key(root).public_key())


@dataclass
class Quote:
    measurement: bytes
    nonce: bytes
    client_key: bytes
    enclave_key: bytes
    signature: bytes

    def body(self) -> bytes:
        return QUOTE_LABEL + self.measurement + self.nonce + self.client_key + self.enclave_key


def make_quote(root: bytes, meas: bytes, nonce: bytes, client_key: bytes, enclave_key: bytes) -> Quote:
    q = Quote(meas, nonce, client_key, enclave_key, b"")
    q.signature = attestation_key(root).sign(q.body())
    return q


def verify_quote(q: Quote, device_pub: bytes, expected_measurement: bytes, nonce: bytes, client_key: bytes) -> None:
    """Raises TinyshieldError unless the quote is signed by the device, for this code, this nonce, this client."""
    try:
        Ed25519PublicKey.from_public_bytes(device_pub).verify(q.signature, q.body())
    except (InvalidSignature, ValueError) as e:
        raise TinyshieldError("attestation refused: the quote's signature does not verify with the device key") from e
    if q.measurement != expected_measurement:
        raise TinyshieldError("attestation refused: the enclave's measurement is not the expected one "
                              "(different code or config) — do not send it inputs")
    if q.nonce != nonce or q.client_key != client_key:
        raise TinyshieldError("attestation refused: the quote answers another request (stale or replayed nonce)")


class Channel:
    """AES-GCM over an X25519 shared secret; a per-direction counter nonce refuses replays and reordering."""

    def __init__(self, own: X25519PrivateKey, peer_pub: bytes, transcript: bytes, initiator: bool):
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_pub))
        self.aead = AESGCM(derive(shared, b"channel\0" + transcript))
        self.send_dir, self.recv_dir = (b"C", b"E") if initiator else (b"E", b"C")
        self.sent = self.received = 0

    def _nonce(self, d: bytes, n: int) -> bytes:
        return d + n.to_bytes(11, "big")

    def encrypt(self, data: bytes) -> tuple[bytes, int]:
        n = self.sent
        self.sent += 1
        return self.aead.encrypt(self._nonce(self.send_dir, n), data, None), n

    def decrypt(self, blob: bytes, n: int) -> bytes:
        if n != self.received:
            raise TinyshieldError(f"channel message {n} out of order (expected {self.received}): replay refused")
        try:
            out = self.aead.decrypt(self._nonce(self.recv_dir, n), blob, None)
        except Exception as e:
            raise TinyshieldError("channel message does not authenticate: tampered or replayed") from e
        self.received += 1
        return out


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    k = X25519PrivateKey.generate()
    return k, _raw(k.public_key())


def fresh_nonce() -> bytes:
    return os.urandom(16)

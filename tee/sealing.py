"""Sealed storage: AES-GCM under a key derived (HKDF) from the device root key and the enclave measurement.

The measurement is sha256 over the enclave's code and its configuration, so a changed enclave derives
a different key and cannot unseal; the AAD binds each blob to its purpose, so blobs cannot be swapped.
The device root key stands in for a fused hardware secret: a 32-byte file under build/tee/ that only
the enclave process (and the provisioning step of `tinyshield protect`) reads.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from base.errors import TinyshieldError
from base.paths import build_dir

SEAL_MAGIC = b"TSHSEAL1"
TEE_DIR = Path(__file__).resolve().parent
# The code that runs inside the enclave process; any change to it changes the measurement.
ENCLAVE_CODE = ("enclave.py", "program.py", "shadownet.py", "blinded.py", "fieldgemm.py", "fieldmath.py",
                "fieldkernels.py", "csrc/field.c", "link.py", "messages.py", "sealing.py", "attestation.py", "dma.py",
                "modes/__init__.py", "modes/plain.py", "modes/enclave_only.py", "modes/shadownet.py",
                "modes/blinded.py", "modes/sliced.py")


def root_key_path() -> Path:
    return Path(os.environ.get("TINYSHIELD_ROOT_KEY", build_dir() / "tee" / "device_root.key"))


def device_root_key() -> bytes:
    """The simulated fused device secret; created once, on first use."""
    path = root_key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    key = path.read_bytes()
    if len(key) != 32:
        raise TinyshieldError(f"{path}: device root key must be 32 bytes, found {len(key)}; delete it to make a "
                              "new one (every sealed bundle must then be protected again)")
    return key


def code_digest(files: tuple[str, ...] = ENCLAVE_CODE, root: Path = TEE_DIR) -> bytes:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return h.digest()


def measurement(config: dict, code: bytes | None = None) -> bytes:
    """sha256(code digest || canonical JSON of the enclave configuration)."""
    code = code_digest() if code is None else code
    return hashlib.sha256(b"tinyshield-enclave-v1\0" + code + json.dumps(config, sort_keys=True).encode()).digest()


def derive(root: bytes, info: bytes, salt: bytes = b"tinyshield-v1") -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(root)


def seal_key(root: bytes, meas: bytes) -> bytes:
    return derive(root, b"seal\0" + meas)


def seal(key: bytes, data: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return SEAL_MAGIC + nonce + AESGCM(key).encrypt(nonce, data, aad)


def unseal(key: bytes, blob: bytes, aad: bytes, what: str = "sealed data") -> bytes:
    if len(blob) < len(SEAL_MAGIC) + 12 + 16 or not blob.startswith(SEAL_MAGIC):
        raise TinyshieldError(f"{what}: not a sealed blob (bad header) — re-run `tinyshield protect`")
    nonce = blob[len(SEAL_MAGIC):len(SEAL_MAGIC) + 12]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(SEAL_MAGIC) + 12:], aad)
    except InvalidTag as e:
        raise TinyshieldError(
            f"{what}: cannot unseal — the blob was tampered with, or it was sealed for another enclave "
            "measurement (changed code or config) or another device; re-run `tinyshield protect`") from e

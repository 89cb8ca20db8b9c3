"""Experts on storage: one safetensors file per expert, a manifest with sha256 checksums.

Layout of a store directory:
    manifest.json          model config, dtype, and per expert: file, sha256, file bytes, RAM bytes
    dense.safetensors      everything that is not an expert (embeddings, attention, routers, head)
    experts/L{l}E{e}.safetensors   `w1`, `w2` (float32), or int8 `w1`, `w2` + per-output-channel `s1`, `s2`

Reads go to the device, not the page cache: after reading a file we call
`posix_fadvise(POSIX_FADV_DONTNEED)` on it, so the next read of the same expert is a real read again
(O_DIRECT would also work but needs aligned buffers and is refused by some file systems).
Every read is checked against the manifest's sha256 before it is parsed.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from edge.errors import TinyshieldError
from edge.moe.model import MoEConfig, MoEModel

Key = tuple[int, int]  # (layer, expert)


@dataclass
class Expert:
    """One expert as it sits in RAM: float32 weights, or int8 weights with per-channel scales."""
    w1: torch.Tensor
    w2: torch.Tensor
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w1, self.w2, self.s1, self.s2) if t is not None)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.s1 is None:
            return self.w1, self.w2
        return self.w1.float() * self.s1, self.w2.float() * self.s2


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (the last axis: `h @ w` writes columns)."""
    scale = w.abs().amax(0).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def expert_tensors(w1: torch.Tensor, w2: torch.Tensor, int8: bool) -> dict[str, torch.Tensor]:
    w1, w2 = w1.detach().float().contiguous(), w2.detach().float().contiguous()
    if not int8:
        return {"w1": w1, "w2": w2}
    q1, s1 = quantize_int8(w1)
    q2, s2 = quantize_int8(w2)
    return {"w1": q1, "s1": s1, "w2": q2, "s2": s2}


def write_store(model: MoEModel, root: str | Path, int8: bool = False, source: str = "") -> "ExpertStore":
    """Splits `model` into dense weights + one file per expert under `root` and writes the manifest last."""
    root = Path(root)
    (root / "experts").mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    save_file({k: v.detach().contiguous() for k, v in model.dense_state().items()}, str(root / "dense.safetensors"))
    entries = {}
    for l, blk in enumerate(model.blocks):
        for e in range(cfg.experts):
            tensors = expert_tensors(blk.moe.w1[e], blk.moe.w2[e], int8)
            blob = st_save(tensors, metadata={"layer": str(l), "expert": str(e)})
            name = f"experts/L{l}E{e}.safetensors"
            (root / name).write_bytes(blob)
            entries[f"{l}/{e}"] = {"file": name, "sha256": hashlib.sha256(blob).hexdigest(), "file_bytes": len(blob),
                                   "ram_bytes": Expert(**tensors).nbytes}
    manifest = {"format": 1, "model": cfg.to_dict(), "dtype": "int8" if int8 else "float32", "source": str(source),
                "experts": entries}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return ExpertStore(root)


class ExpertStore:
    """Reads experts on demand; thread-safe; counts the bytes and time spent reading."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mf = self.root / "manifest.json"
        if not mf.is_file():
            raise TinyshieldError(f"{self.root}: no expert store here (manifest.json missing) — "
                                  "create one with `tinyshield moe trace` or `tinyshield moe run`")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise TinyshieldError(f"{mf}: invalid JSON ({e}) — delete the store directory to rebuild it") from e
        self.cfg = MoEConfig(**self.manifest["model"])
        self.int8 = self.manifest["dtype"] == "int8"
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads = 0
        self.read_seconds = 0.0

    def keys(self) -> list[Key]:
        return [(l, e) for l in range(self.cfg.layers) for e in range(self.cfg.experts)]

    def entry(self, key: Key) -> dict:
        try:
            return self.manifest["experts"][f"{key[0]}/{key[1]}"]
        except KeyError:
            raise TinyshieldError(f"expert {key} is not in the store's manifest {self.root / 'manifest.json'} "
                                  f"(model has {self.cfg.layers} layers x {self.cfg.experts} experts)") from None

    @property
    def expert_bytes(self) -> int:
        """RAM bytes of one expert (all experts have the same shape)."""
        return self.entry((0, 0))["ram_bytes"]

    @property
    def total_bytes(self) -> int:
        return sum(v["ram_bytes"] for v in self.manifest["experts"].values())

    def dense_state(self) -> dict[str, torch.Tensor]:
        from edge.models.io import read_safetensors
        return read_safetensors(self.root / "dense.safetensors")

    def _read_file(self, path: Path) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            chunks, got = [], 0
            while got < size:
                b = os.read(fd, size - got)
                if not b:
                    break
                chunks.append(b)
                got += len(b)
            # Drop the file's pages so the next read of this expert goes to the device again.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return b"".join(chunks)

    def read(self, key: Key) -> Expert:
        ent = self.entry(key)
        path = self.root / ent["file"]
        name = f"expert L{key[0]}E{key[1]}"
        t0 = time.perf_counter()
        try:
            blob = self._read_file(path)
        except FileNotFoundError:
            raise TinyshieldError(f"{name}: file {path} is missing — rebuild the store "
                                  "(delete its directory and rerun the command)") from None
        dt = time.perf_counter() - t0
        with self._lock:
            self.bytes_read += len(blob)
            self.reads += 1
            self.read_seconds += dt
        if hashlib.sha256(blob).hexdigest() != ent["sha256"]:
            raise TinyshieldError(f"{name}: checksum mismatch in {path} (sha256 differs from the manifest) — "
                                  "the file is corrupt; rebuild the store")
        try:
            t = st_load(blob)
        except (SafetensorError, ValueError) as e:
            raise TinyshieldError(f"{name}: {path} is not a valid safetensors file ({e})") from e
        return Expert(t["w1"], t["w2"], t.get("s1"), t.get("s2"))

    def load_all(self) -> dict[Key, Expert]:
        return {k: self.read(k) for k in self.keys()}

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_read, self.reads, self.read_seconds = 0, 0, 0.0


def store_for(model_dir: str | Path, int8: bool = False) -> ExpertStore:
    """The expert store of a trained model directory, built once under build/moe-store/<hash>/."""
    from edge.moe.train import load
    from edge.paths import artefact_dir

    model_dir = Path(model_dir)
    st = (model_dir / "model.safetensors").stat()
    d = artefact_dir("moe-store", {"model": str(model_dir.resolve()), "mtime": st.st_mtime_ns, "int8": int8})
    if (d / "manifest.json").is_file():
        return ExpertStore(d)
    model, _ = load(model_dir)
    return write_store(model, d, int8=int8, source=model_dir)

"""Experts on storage: one safetensors file per expert, a manifest with sha256 checksums.

Layout of a store directory:
    manifest.json          model config, dtype, and per expert: file, sha256, file bytes, RAM bytes, and the
                           same four for each low-precision copy under "copies"
    dense.safetensors      everything that is not an expert (embeddings, attention, routers, head)
    experts/L{l}E{e}.safetensors   `w1`, `w2` (float32), or int8 `w1`, `w2` + per-output-channel `s1`, `s2`
    experts/int8/L{l}E{e}.safetensors   low-precision copy: int8 per output channel
    experts/int4/L{l}E{e}.safetensors   low-precision copy: int4 per output channel, two values a byte

The low-precision copies are what a cheap miss reads (HOBBIT): an expert that matters little for this
token is read at 1/4 or 1/8 of the bytes. An int4 copy stays packed in RAM (half the bytes of int8: what
lets the least-used experts of a budget stay resident, `edge.moe.placement`) and is multiplied a nibble
at a time, never unpacked whole (`Expert.ffn`).

On the host profile reads go to this machine's disk, not the page cache: after reading a file we call
`posix_fadvise(POSIX_FADV_DONTNEED)` on it, so the next read of the same expert is a real read again
(O_DIRECT would also work but needs aligned buffers and is refused by some file systems). On a device
profile (`edge.moe.storage`) the file is still read, but its pages stay cached: the profile's device
sets the time, and this shared machine's virtual disk (measured at ~5 ms for a 105 kB read under load,
slower than an SD card) would otherwise put its own contention into every device's figures.
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
from torch.nn import functional as F
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from base.errors import TinyshieldError
from base.quant import quantize_weights_f32
from edge.moe.kernels import expert_ffn
from edge.moe.model import MoEConfig, MoEModel

Key = tuple[int, int]  # (layer, expert)


PRECISIONS = ("full", "int8", "int4")  # "full" = the store's own dtype (float32, or int8 for an int8 store)


@dataclass
class Expert:
    """One expert as it sits in RAM: float32 weights, or int8 weights with per-channel scales, or int4
    weights packed two a byte (uint8, `quantize_int4`'s layout) with per-channel scales.

    `precision` says which copy it came from ("float32", "int8", "int4")."""
    w1: torch.Tensor
    w2: torch.Tensor
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    precision: str = "float32"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w1, self.w2, self.s1, self.s2) if t is not None)

    @property
    def quantised(self) -> bool:
        return self.s1 is not None

    @property
    def packed(self) -> bool:
        return self.w1.dtype == torch.uint8

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float weights (dequantised): the reference, and what the batched model is rebuilt from."""
        if self.s1 is None:
            return self.w1, self.w2
        if self.packed:
            return unpack_int4(self.w1).float() * self.s1, unpack_int4(self.w2).float() * self.s2
        return self.w1.float() * self.s1, self.w2.float() * self.s2

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """GELU(h @ w1) @ w2 for a few rows h.

        Quantised weights go to the C kernel (`edge.moe.kernels`): the per-output-channel scale commutes
        with the product, h @ (q * s) = (h @ q) * s, so it scales the (1 x f) and (1 x d) outputs, and the
        int8 (or int4) weights are widened one at a time inside the product, never into a float copy of
        the expert (which, in torch, cost more than the product itself)."""
        if self.s1 is None:
            return F.gelu(h @ self.w1) @ self.w2
        return expert_ffn(h, self.w1, self.s1, self.w2, self.s2)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (the last axis: `h @ w` writes columns), base.quant's rule for
    edge weights (quantize_weights_f32)."""
    q, scale = quantize_weights_f32(w.detach().numpy(), axis=-1)
    return torch.from_numpy(q), torch.from_numpy(scale)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 (-7..7) per output channel, packed two a byte along the first axis (low nibble first).

    With 15 levels, scaling to the channel's max wastes most of them on rare large weights; the scale is
    the clipping ratio (of the max) with the least squared error per channel, searched on a grid."""
    amax = w.abs().amax(0).clamp_min(1e-12)
    best_err, scale = None, amax / 7.0
    for r in torch.linspace(0.5, 1.0, 11):
        s = amax * r / 7.0
        err = ((torch.round(w / s).clamp(-7, 7) * s - w) ** 2).sum(0)
        if best_err is None:
            best_err, scale = err, s
        else:
            better = err < best_err
            best_err, scale = torch.where(better, err, best_err), torch.where(better, s, scale)
    q = torch.round(w / scale).clamp(-7, 7).to(torch.int8)
    if q.shape[0] % 2:
        raise ValueError(f"int4 packing needs an even number of rows, got {tuple(q.shape)}")
    lo, hi = q[0::2] & 0xF, q[1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8), scale.float()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of the packing in `quantize_int4`: uint8 (r/2, c) -> int8 (r, c) in -8..7."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    lo, hi = lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)  # sign-extend the nibbles
    return torch.stack([lo, hi], 1).reshape(-1, packed.shape[1]).to(torch.int8)


def expert_tensors(w1: torch.Tensor, w2: torch.Tensor, int8: bool | str) -> dict[str, torch.Tensor]:
    """The tensors of one expert file: float32, "int8" (True) or "int4" (packed)."""
    w1, w2 = w1.detach().float().contiguous(), w2.detach().float().contiguous()
    kind = "int8" if int8 is True else (int8 or "float32")
    if kind == "float32":
        return {"w1": w1, "w2": w2}
    quant = quantize_int8 if kind == "int8" else quantize_int4
    q1, s1 = quant(w1)
    q2, s2 = quant(w2)
    return {"w1": q1, "s1": s1, "w2": q2, "s2": s2}


def _file_entry(root: Path, name: str, tensors: dict, meta: dict) -> dict:
    blob = st_save(tensors, metadata=meta)
    (root / name).write_bytes(blob)
    ram = Expert(**{k: v for k, v in tensors.items()}).nbytes  # int4 stays packed in RAM
    return {"file": name, "sha256": hashlib.sha256(blob).hexdigest(), "file_bytes": len(blob), "ram_bytes": ram}


def write_store(model: MoEModel, root: str | Path, int8: bool = False, source: str = "",
                copies: tuple[str, ...] = ("int8", "int4")) -> "ExpertStore":
    """Splits `model` into dense weights + one file per expert (and per low-precision copy) under `root`;
    the manifest is written last, so a store without one is an unfinished store."""
    root = Path(root)
    for d in ("experts", *(f"experts/{c}" for c in copies)):
        (root / d).mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    save_file({k: v.detach().contiguous() for k, v in model.dense_state().items()}, str(root / "dense.safetensors"))
    entries = {}
    for l, blk in enumerate(model.blocks):
        for e in range(cfg.experts):
            meta = {"layer": str(l), "expert": str(e)}
            w1, w2 = blk.moe.w1[e], blk.moe.w2[e]
            ent = _file_entry(root, f"experts/L{l}E{e}.safetensors", expert_tensors(w1, w2, int8), meta)
            ent["copies"] = {c: _file_entry(root, f"experts/{c}/L{l}E{e}.safetensors", expert_tensors(w1, w2, c),
                                            {**meta, "precision": c}) for c in copies}
            entries[f"{l}/{e}"] = ent
    manifest = {"format": 3, "model": cfg.to_dict(), "dtype": "int8" if int8 else "float32", "source": str(source),
                "experts": entries}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return ExpertStore(root)


class ExpertStore:
    """Reads experts on demand; thread-safe; counts the bytes and time spent reading."""

    def __init__(self, root: str | Path, storage: str | None = None, drop_cache: bool | None = None):
        """storage: a profile of `edge.moe.storage.PROFILES` ("emmc", "sd", ...); None or "host" reads at
        whatever speed this machine's disk has. drop_cache: drop each file's pages after reading it
        (default: on the host profile only)."""
        from edge.moe.storage import Device, profile

        self.root = Path(root)
        prof = profile(storage)
        self.device = Device(prof) if prof is not None else None
        self.drop_cache = prof is None if drop_cache is None else drop_cache
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

    @property
    def storage(self) -> str:
        return self.device.profile.name if self.device is not None else "host"

    def entry(self, key: Key, precision: str = "full") -> dict:
        try:
            ent = self.manifest["experts"][f"{key[0]}/{key[1]}"]
        except KeyError:
            raise TinyshieldError(f"expert {key} is not in the store's manifest {self.root / 'manifest.json'} "
                                  f"(model has {self.cfg.layers} layers x {self.cfg.experts} experts)") from None
        if precision == "full":
            return ent
        try:
            return ent["copies"][precision]
        except KeyError:
            raise TinyshieldError(f"expert L{key[0]}E{key[1]}: the store {self.root} has no {precision} copy "
                                  f"(it has {sorted(ent.get('copies', {})) or 'none'}) — rebuild it with "
                                  "write_store(..., copies=('int8', 'int4'))") from None

    @property
    def copies(self) -> list[str]:
        return sorted(self.entry((0, 0)).get("copies", {}))

    def expert_bytes_of(self, precision: str) -> int:
        """RAM bytes of one expert read at `precision`."""
        return self.entry((0, 0), precision)["ram_bytes"]

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
            if self.drop_cache:  # the next read of this expert goes to the disk again
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return b"".join(chunks)

    def read(self, key: Key, precision: str = "full") -> Expert:
        """Reads one expert (or its low-precision copy) from storage, checked against the manifest's sha256."""
        ent = self.entry(key, precision)
        path = self.root / ent["file"]
        name = f"expert L{key[0]}E{key[1]}" + ("" if precision == "full" else f" ({precision} copy)")
        t0 = time.perf_counter()
        try:
            if self.device is not None:  # the profile's device: the read lasts latency + bytes / bandwidth
                blob = self.device.read(lambda: self._read_file(path), ent["file_bytes"])
            else:
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
        missing = [k for k in (("w1", "w2") if precision == "full" and not self.int8 else ("w1", "w2", "s1", "s2"))
                   if k not in t]
        if missing:
            raise TinyshieldError(f"{name}: {path} has no tensor {missing[0]!r} — rebuild the store")
        if t["w1"].dtype == torch.uint8:  # packed int4, kept packed
            return Expert(t["w1"], t["w2"], t["s1"], t["s2"], "int4")
        kind = "float32" if "s1" not in t else "int8"
        return Expert(t["w1"], t["w2"], t.get("s1"), t.get("s2"), kind)

    def load_all(self) -> dict[Key, Expert]:
        return {k: self.read(k) for k in self.keys()}

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_read, self.reads, self.read_seconds = 0, 0, 0.0
        if self.device is not None:
            self.device.modelled_seconds = 0.0


def store_for(model_dir: str | Path, int8: bool = False, storage: str | None = None) -> ExpertStore:
    """The expert store of a trained model directory, built once under build/moe-store/<hash>/; reads
    are throttled to the `storage` profile."""
    from edge.moe.train import load
    from base.paths import artefact_dir

    model_dir = Path(model_dir)
    st = (model_dir / "model.safetensors").stat()
    d = artefact_dir("moe-store", {"model": str(model_dir.resolve()), "mtime": st.st_mtime_ns, "int8": int8,
                                   "format": 3})  # 3: int4 copies' RAM bytes are their packed size
    if not (d / "manifest.json").is_file():
        model, _ = load(model_dir)
        write_store(model, d, int8=int8, source=model_dir)
    return ExpertStore(d, storage=storage)

"""`protect`: turn a model into a protected bundle for one mode.

Layout of a bundle directory:
  bundle.json          public header: mode, model kind/config, input shape, measurement, device key
  enclave.sealed       plaintext weights + the mode's secrets, sealed to the enclave measurement
  pads/NNNNNN.sealed   blinded and sliced modes: one-time masks and unblinding factors, one file per inference
  accelerator/         what the untrusted accelerator gets: weights.safetensors (+ one .tflite per layer)
The provisioning step runs here, on the owner's machine, with the device root key; the enclave later
unseals with the same key only if its measured code and config are unchanged.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from safetensors.numpy import save_file as st_save_file

from base.errors import TinyshieldError
from edge.models.bert import served
from tee import modes, program
from tee.attestation import device_public_key
from tee.sealing import device_root_key, measurement, seal, seal_key, unseal

MODES = modes.MODES
FORMAT = 1
CALIB_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A remarkably moving film, beautifully acted and written with real care.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "I would not recommend this product to anyone; it broke after two days.",
    "The team won the championship in overtime with a last-second goal.",
    "Researchers found a new method to train small language models on microcontrollers.",
    "Where is the nearest train station?",
    "Protected inference keeps the model's secrets inside an enclave.",
]


@dataclass
class Bundle:
    path: Path
    header: dict
    seconds: float = 0.0
    sizes: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.header["mode"]

    @property
    def measurement(self) -> bytes:
        return bytes.fromhex(self.header["measurement"])


def enclave_config(mode: str, kind: str, model_cfg: dict, input_spec: dict, rows: dict, params: dict) -> dict:
    """Everything the enclave's behaviour depends on besides its code: part of the measurement."""
    return {"format": FORMAT, "mode": mode, "kind": kind, "model": model_cfg, "input": input_spec,
            "rows": rows, "params": params}


def kind_of(model) -> str:
    """Which class the enclave builds from the sealed config and weights."""
    from edge.models.bert import BertClassifier, BertModel, MeanPooled
    from edge.models.sliced import SlicedClassifier
    from edge.models.vit import ViT
    if isinstance(model, ViT):
        return "vit"
    if isinstance(model, SlicedClassifier):
        return "sliced-classifier"
    if isinstance(model, BertClassifier):
        return "bert-classifier"
    if isinstance(model, (BertModel, MeanPooled)):
        return "bert"
    raise TinyshieldError(f"cannot protect a {type(model).__name__}: supported are ViT, BertClassifier, BertModel")


def captured(model, spec: dict, only: frozenset[str] | None = None) -> program.Program:
    """The served model captured for the bundle's input shapes; `only`: the linears that may be outsourced."""
    example = {k: np.zeros(s, dtype=np.float32 if k == "image" else np.int32) for k, s in spec.items()}
    return program.of(model, example, only)


def model_config(model) -> dict:
    cfg = model.config.to_dict()
    if kind_of(model) in ("bert-classifier", "sliced-classifier"):
        cfg["num_labels"] = model.num_labels
    if kind_of(model) == "sliced-classifier":
        cfg["rank"] = model.rank
    return cfg


def calibration_inputs(model, seq_len: int, n: int = 8) -> list[dict[str, np.ndarray]]:
    """Sample inputs for calibrating scales: real sentences for text models, real digits for the ViT."""
    if kind_of(model) == "vit":
        c = model.config
        try:
            from base import data
            imgs = data.mnist(allow_fallback=True).x_test[:n].astype(np.float32) / 255.0
            if imgs.shape[1:] != (c.image_size, c.image_size):
                raise TinyshieldError("image size differs")
            imgs = imgs[:, None]
        except TinyshieldError:
            imgs = np.random.default_rng(0).random((n, c.in_chans, c.image_size, c.image_size), dtype=np.float32)
        return [{"image": imgs[i:i + 1]} for i in range(len(imgs))]
    from edge.models.minilm import load_tokenizer, tokenize
    tok = load_tokenizer()
    out = []
    for s in CALIB_SENTENCES[:n]:
        b = tokenize(tok, [s], pad_to=seq_len)
        out.append({"input_ids": b.input_ids.numpy().astype(np.int32),
                    "attention_mask": b.attention_mask.numpy().astype(np.int32)})
    return out


def record_inputs(model, calib) -> dict[str, np.ndarray]:
    """The fp32 inputs every linear layer sees on the calibration set (rows stacked)."""
    seen: dict[str, list[np.ndarray]] = {}
    base = program.plain_lin(program.linears(program.of(model, calib[0])))

    def lin(name, x):
        seen.setdefault(name, []).append(x.numpy().copy())
        return base(name, x)

    for inp in calib:
        program.forward(model, inp, lin)
    return {k: np.concatenate(v) for k, v in seen.items()}


def input_spec(model, seq_len: int) -> dict:
    if kind_of(model) == "vit":
        c = model.config
        return {"image": [1, c.in_chans, c.image_size, c.image_size]}
    return {"input_ids": [1, seq_len], "attention_mask": [1, seq_len]}


def load_pt2(raw: bytes) -> program.Program:
    """A user's exported program (.pt2 bytes) as the enclave runs it; its inputs keep their placeholder names.
    Read from memory: the enclave never writes the unsealed model to disk."""
    import io

    from edge.capture import _finish
    ep = torch.export.load(io.BytesIO(raw))
    if not ep.example_inputs or not ep.example_inputs[0]:
        raise TinyshieldError("the .pt2 carries no example inputs; export it with torch.export.export(model, (x,))")
    cap = _finish(ep, tuple(ep.example_inputs[0]), batch_one=False)
    return program.from_captured(cap, cap.user_inputs)


@torch.no_grad()
def protect(model, out_dir: str | Path, mode: str, kind: str | None = None, seq_len: int = 128, pads: int = 4,
            fake_ratio: float = 0.25, mask_pool: int = 4, litert: bool = True, seed: int | None = None) -> Bundle:
    """`model`: an nn.Module, or the path of a .pt2 (torch.export.save), whose bytes are sealed into the bundle."""
    how = modes.get(mode)
    if pads < 0 or mask_pool < 1 or not 0 < fake_ratio <= 4:
        raise TinyshieldError("pads must be >= 0, mask pool >= 1 and fake ratio in (0, 4]")
    out = Path(out_dir)
    if out.exists() and not (out / "bundle.json").is_file():
        raise TinyshieldError(f"{out} exists and is not a protected bundle: choose another --out directory")
    t0 = time.perf_counter()
    if isinstance(model, (str, Path)):
        raw = Path(model).read_bytes()
        how.outsourced(None)    # a .pt2 names no public part: a mode that outsources only public layers refuses
        prog, kind, model_cfg = load_pt2(raw), "pt2", {}
        spec = {n: list(x.shape) for n, x in zip(prog.inputs, prog.cap.example)}
        secrets: dict[str, np.ndarray] = {"pt2": np.frombuffer(raw, np.uint8).copy()}
        # the only inputs known are the file's example: blinded scales are calibrated on it alone
        calib = [{n: x.numpy() for n, x in zip(prog.inputs, prog.cap.example)}]
    else:
        kind = kind or kind_of(model)
        model = served(model.eval())
        spec, model_cfg = input_spec(model, seq_len), model_config(model)
        prog = captured(model, spec, how.outsourced(model))
        secrets = {f"model.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}
        calib = calibration_inputs(model, seq_len) if how.calibrates else []
    rows = program.rows_per_call(prog)
    prep = modes.Prep(program.linears(prog), rows, record_inputs(prog, calib) if how.calibrates else {},
                      np.random.default_rng(seed), {"fake_ratio": fake_ratio, "mask_pool": mask_pool})
    prepared = how.prepare(prep)
    root = device_root_key()
    accel, mode_params = prepared.accel, prepared.params
    secrets.update(prepared.secrets)
    layer_shapes = {name: [rows[name], int(a.shape[0]), int(a.shape[1])] for name, a in accel.items()}
    if out.exists():   # an older bundle: replaced only now that the new one is ready to be written
        shutil.rmtree(out)
    (out / "accelerator").mkdir(parents=True)
    (out / "pads").mkdir()
    cfg = enclave_config(mode, kind, model_cfg, spec, rows, mode_params)
    meas = measurement(cfg)
    key = seal_key(root, meas)
    blob = seal(key, st_save(secrets), b"bundle\0" + meas)
    (out / "enclave.sealed").write_bytes(blob)
    sizes = {"enclave.sealed": len(blob)}
    if accel:
        st_save_file(accel, str(out / "accelerator" / "weights.safetensors"))
        sizes["accelerator"] = (out / "accelerator" / "weights.safetensors").stat().st_size
    backend = "torch"
    if litert and how.litert:
        backend = export_litert(accel, layer_shapes, out / "accelerator") or "torch"
    header = {"format": FORMAT, "mode": mode, "kind": kind, "enclave_config": cfg, "measurement": meas.hex(),
              "device_key": device_public_key(root).hex(),
              "accelerator": {"backend": backend, "layers": layer_shapes},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "bundle.json").write_text(json.dumps(header, indent=1))
    if prepared.pad is not None:
        for i in range(pads):
            write_pad(out, i, prepared.pad(), key, meas)
        sizes["pads"] = sum(p.stat().st_size for p in (out / "pads").iterdir())
    return Bundle(out, header, time.perf_counter() - t0, sizes)


def pad_aad(index: int, meas: bytes) -> bytes:
    return b"pad\0" + index.to_bytes(8, "big") + meas


def write_pad(out: Path, index: int, pad: dict[str, np.ndarray], key: bytes, meas: bytes) -> None:
    (out / "pads" / f"{index:06d}.sealed").write_bytes(seal(key, st_save(pad), pad_aad(index, meas)))


def read_sealed(path: Path, key: bytes, aad: bytes) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise TinyshieldError(f"{path}: missing — the bundle is incomplete; run `tinyshield protect` again")
    return st_load(unseal(key, path.read_bytes(), aad, what=str(path)))


def load_header(path: str | Path) -> Bundle:
    d = Path(path)
    f = d / "bundle.json"
    if not f.is_file():
        raise TinyshieldError(f"{d}: not a protected bundle (no bundle.json) — create one with `tinyshield protect MODEL`")
    try:
        header = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise TinyshieldError(f"{f}: invalid JSON ({e})") from e
    if header.get("format") != FORMAT or header.get("mode") not in MODES:
        raise TinyshieldError(f"{f}: unsupported bundle format or mode — protect the model again")
    return Bundle(d, header)


def export_litert(accel: dict[str, np.ndarray], shapes: dict[str, list[int]], out: Path) -> str | None:
    """One fp32 FULLY_CONNECTED .tflite per layer for the LiteRT accelerator; None when no exporter is available."""
    try:
        from tee.litert_backend import export_layers
    except ImportError:
        return None
    export_layers(accel, shapes, out)
    return "litert"

"""Saving and loading model weights (safetensors + JSON config) with errors that name the problem."""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from base.errors import TinyshieldError


class DictConfig:
    """`from_dict` / `to_dict` for a model's config dataclass (what config.json holds). Unknown keys are
    ignored, so an HF config.json with many more fields loads."""

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise TinyshieldError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise TinyshieldError(f"{path}: not a readable safetensors file ({e}) — re-create or re-download it") from e


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TinyshieldError(f"{path}: config file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TinyshieldError(f"{path}: invalid JSON ({e})") from e


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path,
              ignore: tuple[str, ...] = ()) -> None:
    """Strict load: every parameter must be present with the right shape, nothing left over.

    `ignore` lists key prefixes that a checkpoint may carry but the model does not use
    (e.g. HF's `embeddings.position_ids` buffer, an unused pooler).
    """
    own = model.state_dict()
    extra = [k for k in state if k not in own and not k.startswith(ignore)]
    missing = [k for k in own if k not in state]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s), e.g. {extra[0]}")
        raise TinyshieldError(f"{source}: weights do not match the config: {'; '.join(parts)}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise TinyshieldError(
                f"{source}: weights do not match the config: {k} has shape {tuple(state[k].shape)}, "
                f"config expects {tuple(v.shape)}")
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in own.items()})


def save_model(model: nn.Module, directory: str | Path, config: dict) -> Path:
    """Writes `model.safetensors` and `config.json` into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return d

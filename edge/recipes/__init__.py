"""Training recipes: `tinyshield train NAME`. Each returns a `Trained` result and caches by config hash.

Trained weights also ship inside the package (edge/recipes/weights/<name>/<key hash>/: model.safetensors +
config.json whose "shipped" section records the recipe's cache key and the figures the copy reaches). A recipe
whose key equals a shipped copy's uses it instead of training; `force=True` (`tinyshield train NAME --force`)
trains anyway. `ship()` writes such a copy from a trained model directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
MAX_SHIPPED_BYTES = 3 << 20   # no file of a shipped copy may be larger


@dataclass
class Trained:
    name: str
    path: Path              # directory with model.safetensors + config.json
    metrics: dict = field(default_factory=dict)
    cached: bool = False    # True when a previous run with the same config was reused
    shipped: bool = False   # True when the copy shipped inside the package was used
    key: dict | None = None  # the recipe's cache key (None: not computable here, e.g. without the data)
    note: str = ""          # how a shipped copy differs from what was asked, when it does


def recipes() -> dict:
    """Name -> callable(**overrides) -> Trained. Imported lazily: training pulls in torch."""
    from edge.recipes import bert_tiny_sst2, minilm_task, vit_mnist

    return {"vit-mnist": vit_mnist.train, "bert-tiny-sst2": bert_tiny_sst2.train, **minilm_task.recipe_table()}


def trainable() -> dict:
    """What `tinyshield train` accepts: the recipes plus models derived from them (the 1 MB CLR BERT-tiny)."""
    from edge.recipes import bert_tiny_sst2

    return {**recipes(), bert_tiny_sst2.COMPRESSED: bert_tiny_sst2.compressed_1mb}


# ---------------------------------------------------------------- shipped weights

def _canonical(key) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def shipped_copies(name: str) -> list[Path]:
    """Every shipped copy of `name` (directories), newest key first is not implied: sorted by hash."""
    d = WEIGHTS / name
    return sorted(p for p in d.iterdir() if (p / "config.json").is_file()) if d.is_dir() else []


def shipped_info(path: Path) -> dict:
    """The "shipped" section of a shipped copy's config.json (key, metrics, sizes)."""
    from edge.models.io import read_json

    return read_json(Path(path) / "config.json").get("shipped", {})


def shipped(name: str, key) -> Trained | None:
    """The shipped copy of recipe `name` whose recorded key equals `key`, or None."""
    from edge.models.io import read_json
    from base.paths import config_hash

    d = WEIGHTS / name / config_hash(key)
    if not ((d / "config.json").is_file() and (d / "model.safetensors").is_file()):
        return None
    cfg = read_json(d / "config.json")
    if _canonical(cfg.get("shipped", {}).get("key")) != _canonical(key):
        return None
    return Trained(name, d, cfg.get("metrics", {}), cached=True, shipped=True, key=key)


def ship(name: str, src: str | Path, key, figures: dict) -> Path:
    """Copy the trained model in `src` into the package as the shipped copy of `name` for `key`, recording the
    key and `figures` (what the copy reaches, e.g. accuracy on a named slice). Tensors are copied as they are
    (float32 and int8): every copy fits the 3 MB limit exactly, so nothing is rounded."""
    from base.errors import TinyshieldError
    from base.paths import config_hash

    src = Path(src)
    weights = src / "model.safetensors"
    if weights.stat().st_size > MAX_SHIPPED_BYTES:
        raise TinyshieldError(f"{weights}: {weights.stat().st_size:,} B is over the {MAX_SHIPPED_BYTES:,} B limit "
                              "for a shipped file; compress the model first (tinyshield compress)")
    out = WEIGHTS / name / config_hash(key)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["shipped"] = {"key": json.loads(_canonical(key)), "figures": figures,
                      "bytes": (out / "model.safetensors").stat().st_size}
    (out / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True, default=str) + "\n")
    return out


# ---------------------------------------------------------------- threads

def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(window: float = 0.25) -> float:
    """Cores other processes keep busy now: the machine's non-idle share over a short window of /proc/stat
    (this process sleeps through it). The 1-minute load average, the fallback, lags: right after our own
    set-up or training it still counts that work as somebody else's."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)          # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(window)
        t1, i1 = sample()
        return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def pick_threads(requested: int | None = None) -> int:
    """Torch threads (or emulated boards) for long host work: `requested` if given, else the available cores
    less the ones other processes keep busy, at least 1. More threads than free cores make torch's threads
    spin against each other and the work slows down many times over."""
    if requested:
        return max(1, int(requested))
    cores = available_cores()
    return max(1, min(cores, int(cores - busy_cores() + 0.5)))


@contextlib.contextmanager
def torch_threads(n: int | None = None):
    """Run a block with `pick_threads(n)` torch threads, restoring the previous count after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(pick_threads(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)

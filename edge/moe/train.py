"""`tinyshield moe train`: the byte-level MoE language model on the shared text corpora (cached by config hash).

Training text is the first 95% of each corpus, validation the last 5%, so perplexity is measured on
text the model never saw. The loss is next-byte cross entropy plus `aux_weight` times the
Switch-Transformer load-balancing loss, which keeps all experts in use (otherwise a few experts
win everything and caching becomes trivial).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from base import data
from base.errors import TinyshieldError
from edge.models.io import load_into, read_json, read_safetensors, save_model
from edge.moe.model import VOCAB, MoEConfig, MoEModel
from base.paths import artefact_dir
from base.progress import progress
from edge.recipes import Trained

CORPORA = ("tinyshakespeare", "warpeace", "wikitext2-valid")
VAL_FRACTION = 0.05


def default_threads() -> int:
    """Torch threads for training: the cores this process may use, minus one on small machines.

    More threads than free cores collapse throughput on a shared machine (spinning workers), so on a
    machine of 1-2 usable cores we take one, and never more than two."""
    cores = len(os.sched_getaffinity(0))
    return 1 if cores <= 2 else 2


@dataclass
class MoERecipe:
    model: MoEConfig = field(default_factory=MoEConfig)
    corpora: tuple[str, ...] = CORPORA
    # 1400 steps x 24 x 128 bytes = 4.3 M bytes: ~1.1 s a step at one thread on a 2-core EPYC, inside the
    # ~30 min budget (2000 steps took 39 min and reached 4.21 per-byte perplexity; 1400 still had headroom).
    steps: int = 1400
    batch_size: int = 24
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    aux_weight: float = 0.02
    seed: int = 0
    threads: int = field(default_factory=default_threads)  # not part of the cache key
    eval_tokens: int = 32768  # validation bytes per corpus for the reported perplexity (short: ~20 s)
    log_every: int = 100      # a progress line every N steps (for runs logged to a file)


def tiny_recipe(**overrides) -> MoERecipe:
    """A config that trains in seconds: for tests and smoke runs."""
    base = dict(model=MoEConfig(dim=32, layers=2, heads=2, experts=4, top_k=2, ffn=64, context=64),
                steps=20, batch_size=8, seq_len=32, eval_tokens=2048, threads=1)
    base.update(overrides)
    return MoERecipe(**base)


def split_corpora(names) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    train, val = {}, {}
    for name in names:
        b = np.frombuffer(data.text_corpus(name).encode("utf-8"), dtype=np.uint8)
        cut = int(len(b) * (1 - VAL_FRACTION))
        train[name], val[name] = b[:cut], b[cut:]
    return train, val


def batch(streams: list[np.ndarray], n: int, T: int, g: np.random.Generator) -> torch.Tensor:
    """n random windows of T+1 bytes, corpora sampled in proportion to their size."""
    sizes = np.array([len(s) - T - 1 for s in streams], dtype=np.float64)
    which = g.choice(len(streams), size=n, p=sizes / sizes.sum())
    starts = [g.integers(0, sizes[c]) for c in which]
    return torch.from_numpy(np.stack([streams[c][o:o + T + 1] for c, o in zip(which, starts)]).astype(np.int64))


@torch.no_grad()
def perplexity(model: MoEModel, stream: np.ndarray, max_tokens: int) -> float:
    """exp(mean next-byte NLL) over non-overlapping context windows of the first `max_tokens` bytes."""
    model.eval()
    T = model.cfg.context
    ids = torch.from_numpy(stream[:max_tokens + 1].astype(np.int64))
    nll, count = 0.0, 0
    for i in range(0, len(ids) - 1, T):
        x = ids[i:i + T + 1]
        if len(x) < 2:
            break
        logits = model(x[None, :-1])[0]
        nll += F.cross_entropy(logits, x[1:], reduction="sum").item()
        count += len(x) - 1
    return math.exp(nll / count)


def train(recipe: MoERecipe | None = None, force: bool = False, quiet: bool = False, **overrides) -> Trained:
    recipe = recipe or MoERecipe(**overrides)
    if recipe.seq_len > recipe.model.context:
        raise TinyshieldError(f"seq_len {recipe.seq_len} exceeds the model context {recipe.model.context}")
    train_s, val_s = split_corpora(recipe.corpora)
    # threads and logging do not change what is learned: keep them out of the key
    rec = {k: v for k, v in asdict(recipe).items() if k not in ("threads", "log_every")}
    key = {"recipe": rec, "sizes": {k: len(v) for k, v in train_s.items()}, "version": 2}
    out = artefact_dir("models/moe-lm", key)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file() and not force:
        return Trained("moe-lm", out, read_json(out / "config.json").get("metrics", {}), cached=True)

    torch.manual_seed(recipe.seed)
    g = np.random.default_rng(recipe.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    model = MoEModel(recipe.model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "router" not in n]
    other = [p for n, p in model.named_parameters() if p.dim() < 2 or "router" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    total, warm = recipe.steps, max(1, recipe.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    streams = list(train_s.values())
    losses, t0 = [], time.time()
    try:
        with progress(disable=quiet) as bar:
            task = bar.add_task("train moe-lm", total=total, info="")
            for step in range(total):
                model.train()
                x = batch(streams, recipe.batch_size, recipe.seq_len, g)
                logits = model(x[:, :-1])
                lm = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
                loss = lm + recipe.aux_weight * model.aux_loss()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(lm.item())
                bar.update(task, advance=1, info=f"loss {np.mean(losses[-20:]):.3f}")
                if not quiet and recipe.log_every and (step + 1) % recipe.log_every == 0 and not sys.stdout.isatty():
                    print(f"step {step + 1}/{total} loss {np.mean(losses[-recipe.log_every:]):.4f} "
                          f"({time.time() - t0:.0f} s)", flush=True)
        val = {name: round(perplexity(model, s, recipe.eval_tokens), 4) for name, s in val_s.items()}
    finally:
        torch.set_num_threads(threads)
    n_all = sum(p.numel() for p in model.parameters())
    n_exp = sum(b.moe.w1.numel() + b.moe.w2.numel() for b in model.blocks)
    metrics = {"val_perplexity": val, "val_perplexity_mean": round(float(np.mean(list(val.values()))), 4),
               "train_seconds": round(time.time() - t0, 1), "steps": total,
               "first_loss": round(losses[0], 4), "last_loss": round(float(np.mean(losses[-10:])), 4),
               "parameters": n_all, "expert_fraction": round(n_exp / n_all, 4),
               "train_bytes": {k: len(v) for k, v in train_s.items()}}
    save_model(model, out, {"kind": "moe", "model": recipe.model.to_dict(), "recipe": asdict(recipe),
                            "metrics": metrics})
    return Trained("moe-lm", out, metrics)


def load(path) -> tuple[MoEModel, dict]:
    """A trained MoE model directory -> (model in eval mode, its config.json)."""
    from pathlib import Path

    path = Path(path)
    cfg = read_json(path / "config.json")
    if cfg.get("kind") != "moe":
        raise TinyshieldError(f"{path}: not an MoE model (config kind {cfg.get('kind')!r}); "
                              "train one with `tinyshield moe train`")
    model = MoEModel(MoEConfig(**cfg["model"]))
    load_into(model, read_safetensors(path / "model.safetensors"), path / "model.safetensors")
    return model.eval(), cfg

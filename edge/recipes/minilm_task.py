"""`tinyshield train minilm-sliced-sst2` (and -full-, -agnews): all-MiniLM-L6-v2 trained for a task, two ways.

- sliced: partition before training (TEESlice). The published backbone's linear weights and embedding tables
  stay frozen and public; the owner trains low-rank adapters on every encoder linear, the encoder's biases and
  LayerNorms, and the task head -- the private slices the enclave keeps (edge.models.sliced).
- full: the model a user would otherwise ship: every parameter of the same backbone fine-tuned.
Both see the same sentences in the same order for the same number of steps (the same budget). The training
sentences used (`members.npy`, indices into the training split) are kept: the membership audit needs them.
Cached by config hash under build/models/<name>/.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from base import data
from base.errors import TinyshieldError
from base.paths import build_dir, config_hash
from edge.models.io import read_json, save_model
from edge.recipes import Trained, pick_threads
from edge.models.minilm import encode
from edge.train import accuracy, batches, cosine_warmup, fit, logits, pad

TASKS = {"sst2": 2, "agnews": 4}
VARIANTS = ("sliced", "full")


@dataclass
class TaskRecipe:
    task: str = "sst2"
    variant: str = "sliced"
    steps: int = 150             # 4,800 sentences: a few CPU-minutes per model on a shared 2-core machine
    batch_size: int = 32
    lr: float | None = None      # None: 1e-3 for the private slices, 5e-5 for full fine-tuning
    rank: int = 8
    max_len: int = 64
    seed: int = 0
    threads: int | None = None   # not part of the cache key

    @property
    def name(self) -> str:
        return f"minilm-{self.variant}-{self.task}"

    def cache_key(self, tr: data.TextClassification, ev: data.TextClassification) -> dict:
        recipe = {k: v for k, v in asdict(self).items() if k != "threads"}
        return {"recipe": recipe, "data": [data.fingerprint(tr), data.fingerprint(ev)], "version": 1}


def splits(task: str) -> tuple[data.TextClassification, data.TextClassification]:
    """(training, evaluation) split: SST-2 train/dev; AG News dev (a train sample)/test."""
    if task not in TASKS:
        raise TinyshieldError(f"unknown task {task!r}: {', '.join(TASKS)}")
    return (data.sst2("train"), data.sst2("dev")) if task == "sst2" else (data.agnews("dev"), data.agnews("test"))


def build(recipe: TaskRecipe):
    from edge.models.bert import BertClassifier
    from edge.models.minilm import load_minilm
    from edge.models.sliced import from_public

    public = load_minilm()
    if recipe.variant == "sliced":
        model = from_public(public, TASKS[recipe.task], recipe.rank)
        frozen = model.public_state_names()
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
        return model
    if recipe.variant != "full":
        raise TinyshieldError(f"unknown variant {recipe.variant!r}: {', '.join(VARIANTS)}")
    model = BertClassifier(public.config, TASKS[recipe.task])
    model.bert.load_state_dict(public.state_dict())
    return model


def train(recipe: TaskRecipe | None = None, force: bool = False, quiet: bool = False, **overrides) -> Trained:
    recipe = recipe or TaskRecipe(**overrides)
    tr, ev = splits(recipe.task)
    key = recipe.cache_key(tr, ev)
    out = build_dir() / "models" / recipe.name / config_hash(key)
    if not force and (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return Trained(recipe.name, out, read_json(out / "config.json").get("metrics", {}), cached=True, key=key)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    old_threads = torch.get_num_threads()
    threads = pick_threads(recipe.threads)
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(recipe.seed)
        g = np.random.default_rng(recipe.seed)
        model = build(recipe)
        # the sentences this budget covers, the same for both variants: one pass over a random subset
        members = np.sort(g.permutation(len(tr.texts))[:recipe.steps * recipe.batch_size])
        seqs = encode([tr.texts[i] for i in members], recipe.max_len)
        y = torch.from_numpy(tr.labels[members])
        lr = recipe.lr or (1e-3 if recipe.variant == "sliced" else 5e-5)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
        total = recipe.steps
        sched = cosine_warmup(opt, total, warm=max(1, total // 10))
        lengths = np.array([len(s) for s in seqs])

        def loss_fn(idx):
            ids, mask = pad([seqs[j] for j in idx])
            return F.cross_entropy(logits(model, ids, mask), y[idx])

        # one pass: the members make exactly `total` batches
        losses = fit(model, opt, sched, iter(batches(len(seqs), recipe.batch_size, lengths, g)), loss_fn, total,
                     f"train {recipe.name}", quiet)
        t_train = time.time() - t0
        acc = accuracy(model, encode(ev.texts, recipe.max_len), ev.labels)
    finally:
        torch.set_num_threads(old_threads)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics = {"accuracy": acc, "eval": ev.source, "train_seconds": round(t_train, 1), "steps": len(losses),
               "train_sentences": len(members), "threads": threads, "trained_parameters": trainable,
               "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:]))}
    kind = "sliced-classifier" if recipe.variant == "sliced" else "bert-classifier"
    cfg = {"kind": kind, "model": model.config.to_dict(), "num_labels": TASKS[recipe.task],
           "recipe": asdict(recipe), "metrics": metrics}
    if recipe.variant == "sliced":
        cfg["model"]["rank"] = recipe.rank
    np.save(out / "members.npy", members)
    save_model(model, out, cfg)
    return Trained(recipe.name, out, metrics, key=key)


def recipe_table() -> dict:
    """Recipe name -> train(**overrides) for every task and variant."""
    import functools
    return {TaskRecipe(task=t, variant=v).name: functools.partial(train, task=t, variant=v)
            for t in TASKS for v in VARIANTS}

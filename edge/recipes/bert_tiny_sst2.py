"""`tinyshield train bert-tiny-sst2`: a BERT-tiny (2 layers, d=128, 2 heads, FFN 512, MiniLM's
30,522-token vocabulary) for SST-2 sentiment, trained on CPU in minutes from real knowledge.

Three steps, each cheap because the expensive part is cached:
1. Teacher. all-MiniLM-L6-v2 reads every SST-2 sentence once; the mean-pooled hidden states of
   its layers are cached under build/teachers/ (keyed by the texts). A logistic regression on
   them gives soft labels (the teacher), and the last layer's normalised mean is the sentence
   embedding the student learns to reproduce.
2. Initialisation. The student's word, position and token-type embeddings are MiniLM's, projected
   onto the top-128 principal directions of MiniLM's word table (PCA), so every token starts
   from what MiniLM knows about it, including tokens SST-2 never shows.
3. Training. One run of cross-entropy on the labels + KL to the teacher's soft labels + cosine
   to the teacher's sentence embedding (through a linear map that is dropped afterwards).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from base import data
from base.errors import TinyshieldError
from edge.models.bert import BertClassifier, BertConfig, mean_pool
from edge.models.io import read_json, save_model
from base.paths import PROJECT_ROOT, artefact_dir, build_dir, config_hash, files_hash
from base.progress import progress
from edge.recipes import Trained, pick_threads, shipped

TEACHER_LAYERS = (2, 3, 4, 5, 6)  # MiniLM layers whose mean-pooled states feed the teacher


@dataclass
class BertTinyRecipe:
    model: BertConfig = field(default_factory=BertConfig)
    epochs: float = 2.0
    batch_size: int = 64
    lr: float = 2e-3
    embed_lr: float = 5e-3       # the word table learns faster: most rows are seen rarely
    weight_decay: float = 0.01
    max_len: int = 64            # SST-2 sentences fit (longest dev sentence: 57 tokens)
    kd_weight: float = 1.0       # KL to the teacher's soft labels
    kd_temperature: float = 2.0
    emb_weight: float = 1.0      # cosine to the teacher's sentence embedding
    teacher_c: float = 1.0       # inverse L2 strength of the teacher's logistic regression
    seed: int = 0
    max_steps: int | None = None  # smoke tests stop early
    train_limit: int | None = None  # use only the first N training sentences (smoke tests)
    threads: int | None = None   # torch threads (None: the free cores); not part of the cache key

    def cache_key(self, tr: data.TextClassification, dev: data.TextClassification) -> dict:
        """What the weights depend on: the recipe (not how it is run) and the data, named by its content."""
        recipe = {k: v for k, v in asdict(self).items() if k != "threads"}
        return {"recipe": recipe, "data": [data.fingerprint(tr), data.fingerprint(dev)], "version": 2}


def _texts_key(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


@torch.no_grad()
def teacher_features(texts: list[str], batch_size: int = 128, quiet: bool = False) -> np.ndarray:
    """(N, len(TEACHER_LAYERS), 384) float16 mean-pooled MiniLM hidden states, cached by the texts.

    Sentences are sorted by length so batches carry little padding (a 4-minute pass on 2 cores
    for the 67k SST-2 training sentences; afterwards it is read from build/teachers/).
    """
    from edge.models.minilm import load_minilm, load_tokenizer, tokenize

    out_dir = artefact_dir("teachers/minilm-sst2", {"texts": _texts_key(texts), "layers": TEACHER_LAYERS,
                                                    "version": 1})
    path = out_dir / "features.npy"
    if path.is_file():
        return np.load(path)
    model, tok = load_minilm(), load_tokenizer()
    lengths = np.array([sum(e.attention_mask) for e in tok.encode_batch(texts)])
    order = np.argsort(lengths, kind="stable")
    feats = np.zeros((len(texts), len(TEACHER_LAYERS), model.config.hidden_size), dtype=np.float16)
    with progress(disable=quiet) as bar:
        task = bar.add_task("teacher minilm", total=len(texts), info="")
        for i in range(0, len(texts), batch_size):
            idx = order[i:i + batch_size]
            b = tokenize(tok, [texts[j] for j in idx])
            mask_bias = (1.0 - b.attention_mask[:, None, None, :].float()) * -1e9
            x = model.embeddings(b.input_ids)
            pooled = []
            for n, layer in enumerate(model.encoder.layer, start=1):
                x = layer(x, mask_bias)
                if n in TEACHER_LAYERS:
                    pooled.append(mean_pool(x, b.attention_mask))
            feats[idx] = torch.stack(pooled, 1).numpy().astype(np.float16)
            bar.update(task, advance=len(idx))
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    tmp.rename(path)
    return feats


@dataclass
class Teacher:
    logits: np.ndarray      # (N, 2) teacher logits on the training sentences
    embedding: np.ndarray   # (N, 384) MiniLM sentence embeddings (normalised mean of the last layer)
    dev_accuracy: float


def fit_teacher(train_feats: np.ndarray, train_labels: np.ndarray, dev_feats: np.ndarray,
                dev_labels: np.ndarray, c: float = 1.0) -> Teacher:
    """Logistic regression on the concatenated, standardised layer means: soft labels for the student."""
    from sklearn.linear_model import LogisticRegression

    flat = lambda f: f.reshape(len(f), -1).astype(np.float32)
    xt, xd = flat(train_feats), flat(dev_feats)
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=300)
    clf.fit((xt - mu) / sd, train_labels)
    dev_acc = float((clf.predict((xd - mu) / sd) == dev_labels).mean())
    last = train_feats[:, -1].astype(np.float32)
    emb = last / np.linalg.norm(last, axis=1, keepdims=True).clip(1e-9)
    logit1 = clf.decision_function((xt - mu) / sd)
    logits = np.stack([-logit1 / 2, logit1 / 2], 1).astype(np.float32)  # same softmax as the binary LR
    return Teacher(logits, emb, dev_acc)


def pca_init(model: BertClassifier) -> None:
    """Project MiniLM's word/position/type embeddings onto the top principal directions of its word table."""
    from edge.models.minilm import load_minilm

    d = model.config.hidden_size
    teacher = load_minilm().embeddings
    w = teacher.word_embeddings.weight.detach().double()
    if w.shape[0] != model.config.vocab_size:
        raise TinyshieldError(f"PCA initialisation needs MiniLM's vocabulary ({w.shape[0]} tokens); "
                              f"the config has vocab_size={model.config.vocab_size}")
    mu = w.mean(0)
    _, vecs = torch.linalg.eigh((w - mu).T @ (w - mu))
    p = vecs[:, -d:].flip(1)  # (384, d), largest variance first
    emb = model.bert.embeddings
    with torch.no_grad():
        emb.word_embeddings.weight.copy_(((w - mu) @ p).float())
        n_pos = min(emb.position_embeddings.weight.shape[0], teacher.position_embeddings.weight.shape[0])
        emb.position_embeddings.weight[:n_pos].copy_((teacher.position_embeddings.weight[:n_pos].double() @ p).float())
        emb.token_type_embeddings.weight.copy_((teacher.token_type_embeddings.weight.double() @ p).float())


def encode(texts: list[str], max_len: int) -> list[np.ndarray]:
    from edge.models.minilm import load_tokenizer

    tok = load_tokenizer(max_len=max_len)
    tok.no_padding()
    return [np.array(e.ids, dtype=np.int64) for e in tok.encode_batch(texts)]


def pad(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), L), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    ids = torch.from_numpy(ids)
    return ids, (ids != 0).long()


def batches(n: int, batch_size: int, lengths: np.ndarray, g: np.random.Generator):
    """Shuffled batches of similar lengths (little padding): shuffle, sort within pools of 50 batches."""
    perm = g.permutation(n)
    pool = batch_size * 50
    out = []
    for i in range(0, n, pool):
        chunk = perm[i:i + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [out[k] for k in g.permutation(len(out))]


@torch.no_grad()
def predict(model: BertClassifier, seqs: list[np.ndarray], batch: int = 128, word_embeds_fn=None) -> np.ndarray:
    """Predicted class per sequence; `word_embeds_fn(ids)` swaps in another word-embedding lookup
    (e.g. a compressed one)."""
    model.eval()
    order = np.argsort([len(s) for s in seqs])
    out = np.empty(len(seqs), dtype=np.int64)
    for i in range(0, len(seqs), batch):
        idx = order[i:i + batch]
        ids, mask = pad([seqs[j] for j in idx])
        out[idx] = logits(model, ids, mask, word_embeds_fn).argmax(-1).numpy()
    return out


def accuracy(model: BertClassifier, seqs: list[np.ndarray], labels: np.ndarray, batch: int = 128,
             word_embeds_fn=None) -> float:
    """Dev accuracy (see `predict`)."""
    return int((predict(model, seqs, batch, word_embeds_fn) == labels).sum()) / len(seqs)


def logits(model: BertClassifier, ids, mask, word_embeds_fn=None, return_pooled: bool = False):
    we = None if word_embeds_fn is None else word_embeds_fn(ids)
    pooled = mean_pool(model.bert(ids, mask, word_embeds=we), mask)
    out = model.classifier(pooled)
    return (out, pooled) if return_pooled else out


def train(recipe: BertTinyRecipe | None = None, force: bool = False, quiet: bool = False, **overrides) -> Trained:
    recipe = recipe or BertTinyRecipe(**overrides)
    tr, dev = data.sst2("train"), data.sst2("dev")
    if recipe.train_limit is not None:
        tr = data.TextClassification(tr.texts[:recipe.train_limit], tr.labels[:recipe.train_limit], tr.source)
    key = recipe.cache_key(tr, dev)
    out = build_dir() / "models" / "bert-tiny-sst2" / config_hash(key)
    if not force:
        if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
            return Trained("bert-tiny-sst2", out, read_json(out / "config.json").get("metrics", {}), cached=True,
                           key=key)
        copy = shipped("bert-tiny-sst2", key)
        if copy is not None:
            return copy
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(pick_threads(recipe.threads))
    try:
        teacher = fit_teacher(teacher_features(tr.texts, quiet=quiet), tr.labels,
                              teacher_features(dev.texts, quiet=quiet), dev.labels, recipe.teacher_c)
        t_teacher = time.time() - t0
        torch.manual_seed(recipe.seed)
        g = np.random.default_rng(recipe.seed)
        model = BertClassifier(recipe.model, 2)
        pca_init(model)
        proj = torch.nn.Linear(recipe.model.hidden_size, teacher.embedding.shape[1])  # dropped after training
        seqs, dev_seqs = encode(tr.texts, recipe.max_len), encode(dev.texts, recipe.max_len)
        lengths = np.array([len(s) for s in seqs])
        t_logits, t_emb = torch.from_numpy(teacher.logits), torch.from_numpy(teacher.embedding)
        y = torch.from_numpy(tr.labels)

        steps_per_epoch = math.ceil(len(seqs) / recipe.batch_size)
        total = max(1, int(steps_per_epoch * recipe.epochs))
        if recipe.max_steps is not None:
            total = min(total, recipe.max_steps)
        word = model.bert.embeddings.word_embeddings.weight
        rest = [p for n, p in model.named_parameters() if p is not word] + list(proj.parameters())
        opt = torch.optim.AdamW([{"params": [word], "lr": recipe.embed_lr, "weight_decay": 0.0},
                                 {"params": rest, "lr": recipe.lr}], weight_decay=recipe.weight_decay)
        warm = max(1, total // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
        T = recipe.kd_temperature
        losses, step = [], 0
        with progress(disable=quiet) as bar:
            task = bar.add_task("train bert-tiny-sst2", total=total, info="")
            while step < total:
                for idx in batches(len(seqs), recipe.batch_size, lengths, g):
                    if step >= total:
                        break
                    model.train()
                    ids, mask = pad([seqs[j] for j in idx])
                    z, pooled = logits(model, ids, mask, return_pooled=True)
                    loss = F.cross_entropy(z, y[idx])
                    if recipe.kd_weight:
                        kl = F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(t_logits[idx] / T, -1),
                                      log_target=True, reduction="batchmean")
                        loss = loss + recipe.kd_weight * T * T * kl
                    if recipe.emb_weight:
                        cos = F.cosine_similarity(proj(pooled), t_emb[idx], dim=-1)
                        loss = loss + recipe.emb_weight * (1 - cos).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                    step += 1
                    bar.update(task, advance=1, info=f"loss {np.mean(losses[-50:]):.3f}")
        acc = accuracy(model, dev_seqs, dev.labels)
    finally:
        torch.set_num_threads(old_threads)

    metrics = {"dev_accuracy": acc, "teacher_dev_accuracy": teacher.dev_accuracy,
               "train_seconds": round(time.time() - t0, 1), "teacher_seconds": round(t_teacher, 1),
               "steps": step, "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])),
               "train_sentences": len(seqs), "dev_sentences": len(dev_seqs), "data": tr.source,
               "threads": pick_threads(recipe.threads)}
    save_model(model, out, {"kind": "bert-classifier", "model": recipe.model.to_dict(), "num_labels": 2,
                            "recipe": asdict(recipe), "metrics": metrics})
    return Trained("bert-tiny-sst2", out, metrics, key=key)


# ---------------------------------------------------------------- the 1 MB CLR form the demo deploys

COMPRESSED = "bert-tiny-sst2-1mb"
FLASH_BUDGET = "1MB"
CODE_RESERVE = 32 << 10   # flash kept for the firmware's code (~25 KB)


def recipe_from_dict(d: dict) -> BertTinyRecipe:
    """The recipe a config.json records (its "recipe" section)."""
    d = {k: v for k, v in d.items() if k in BertTinyRecipe.__dataclass_fields__}
    if isinstance(d.get("model"), dict):
        d["model"] = BertConfig.from_dict(d["model"])
    return BertTinyRecipe(**d)


def compressed_key(recipe: BertTinyRecipe | None = None) -> dict:
    """The cache key of the recipe's model compressed to 1 MB of flash: the trained model's key, the budget,
    the deployed sequence length and the compression code (a change to any of them compresses again).
    Needs SST-2 (the trained model's key names its data by content)."""
    from edge.compress.model import parse_size

    recipe = recipe or BertTinyRecipe()
    tr, dev = data.sst2("train"), data.sst2("dev")
    return {"model": config_hash(recipe.cache_key(tr, dev)),
            "budget": parse_size(FLASH_BUDGET, "bytes") - CODE_RESERVE, "max_len": recipe.max_len,
            "code": files_hash((PROJECT_ROOT / "edge" / "compress").glob("*.py")), "version": 2}


def compressed_1mb(force: bool = False, quiet: bool = False, threads: int | None = None, any_shipped: bool = False,
                   **overrides) -> Trained:
    """The bert-tiny-sst2 recipe compressed as `tinyshield compress bert-tiny-sst2 --flash 1MB` does (a CLR
    word table, int8 factors, 64 position rows): from the build cache, else the shipped copy whose key
    matches, else trained and compressed here. `any_shipped` (the demo) takes a shipped copy of another
    recipe variant rather than training, saying so in `note`. Without the SST-2 data folder only a shipped
    copy can be used (its key cannot be checked there: it names the data by content)."""
    from edge.compress.pipeline import compress_model
    from edge.models.registry import load_dir
    from edge.recipes import shipped_copies

    def any_copy(note: str) -> Trained:
        copies = shipped_copies(COMPRESSED)
        if not copies:
            raise TinyshieldError(f"{COMPRESSED}: no shipped copy in this package and no SST-2 data to make one: "
                                  "set $TINYSHIELD_DATA or put the data folder at ../shared/data")
        cfg = read_json(copies[-1] / "config.json")
        variant = {k: v for k, v in cfg.get("recipe", {}).items()
                   if k not in ("model", "threads") and v != getattr(BertTinyRecipe(), k, v)}
        if variant:
            note += f"; the shipped copy is of the recipe with {variant}"
        return Trained(COMPRESSED, copies[-1], _clr_metrics(cfg), cached=True, shipped=True, note=note.lstrip("; "))

    if data.data_dir(required=False) is None:
        return any_copy("its key names SST-2 by content and was not checked (no data folder)")
    recipe = BertTinyRecipe(**{**overrides, "threads": threads})
    key = compressed_key(recipe)
    out = build_dir() / "compressed" / f"bert-tiny-sst2-{FLASH_BUDGET}-{config_hash(key)}"
    if not force:
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            return Trained(COMPRESSED, out, _clr_metrics(read_json(out / "config.json")), cached=True, key=key)
        copy = shipped(COMPRESSED, key)
        if copy is not None:
            return copy
        if any_shipped and shipped_copies(COMPRESSED):
            return any_copy(f"not the shipped copy of this recipe's key; `tinyshield train {COMPRESSED}` makes it")
    r = train(recipe, quiet=quiet)
    if not quiet:
        print(f"bert-tiny-sst2: dev accuracy {r.metrics.get('dev_accuracy')} ({r.path}); "
              f"compressing to {FLASH_BUDGET} of flash")
    src = load_dir(r.path)
    old = torch.get_num_threads()
    torch.set_num_threads(pick_threads(threads))
    try:
        report, _ = compress_model(src.model, "bert-tiny-sst2", key["budget"], "bytes", out=out,
                                   max_len=key["max_len"])
    finally:
        torch.set_num_threads(old)
    cfg = read_json(out / "config.json")
    cfg["metrics"] = _clr_metrics(cfg)
    cfg["recipe"] = {k: v for k, v in asdict(recipe).items() if k != "threads"}   # what it was compressed from
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    return Trained(COMPRESSED, out, cfg["metrics"], key=key)


def _clr_metrics(cfg: dict) -> dict:
    """The figures of a compressed model: its own "metrics", else the compression report's."""
    if cfg.get("metrics"):
        return cfg["metrics"]
    q = cfg.get("report", {}).get("quality", {})
    return {"dev_accuracy": q.get("accuracy"), "original_dev_accuracy": q.get("original_accuracy"),
            "dev_sentences": q.get("dev_sentences")}

"""Compress a BERT's word-embedding table into a CLR table, fine-tune briefly, and account sizes.

Works for the BERT-tiny classifier (`BertClassifier`) and for a bare `BertModel` (MiniLM). The CLR
module replaces `embeddings.word_embeddings` in place: `BertEmbeddings` calls it on the token ids
exactly as it called the `nn.Embedding`, so the rest of the model is untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge.compress.clr import CLREmbedding, QuantCLR, factorize, layout_bytes
from edge.compress.search import Cost, SearchResult, min_cost, search
from base.errors import TinyshieldError
from edge.models.bert import BertClassifier, BertModel, mean_pool
from edge.train import batches, cosine_warmup, endless, fit, pad


def bert_of(model: nn.Module) -> BertModel:
    if isinstance(model, BertClassifier):
        return model.bert
    if isinstance(model, BertModel):
        return model
    raise TinyshieldError(f"can only compress BERT models (BertClassifier or BertModel), not {type(model).__name__}")


def word_table(model: nn.Module) -> torch.Tensor:
    emb = bert_of(model).embeddings.word_embeddings
    if not isinstance(emb, nn.Embedding):
        raise TinyshieldError("this model's word embeddings are already compressed")
    return emb.weight.detach()


def set_word_embeddings(model: nn.Module, module: nn.Module) -> None:
    bert_of(model).embeddings.word_embeddings = module


# ---------------------------------------------------------------------------------------------
# sizes

def other_params(model: nn.Module) -> int:
    """Parameters outside the word-embedding table."""
    word = bert_of(model).embeddings.word_embeddings
    skip = {id(p) for p in word.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def int8_bytes(module: nn.Module) -> int:
    """Flash bytes of `module` (word table excluded) as the board stores it (mcu/lower.py):
    Linear: int8 weights + int32 bias, multiplier and shift per output; LayerNorm: int32 multiplier,
    shift and bias per channel; self-attention: a 256-entry int32 exp table; the FFN activation: a
    256-byte table; position + token-type 0 embeddings: one int8 (rows, d) table."""
    from edge.models.bert import BertEmbeddings, BertIntermediate, BertSelfAttention

    if isinstance(module, nn.Linear):
        return module.weight.numel() + 12 * module.out_features
    if isinstance(module, nn.LayerNorm):
        return 12 * module.normalized_shape[0]
    if isinstance(module, BertEmbeddings):
        return module.position_embeddings.weight.numel() + int8_bytes(module.LayerNorm)
    own = {BertSelfAttention: 256 * 4, BertIntermediate: 256}.get(type(module), 0)
    return own + sum(int8_bytes(m) for m in module.children())


def other_bytes(model: nn.Module) -> int:
    """int8 flash bytes of everything but the word table."""
    bert = bert_of(model)
    head = int8_bytes(model.classifier) if isinstance(model, BertClassifier) else 0
    pooler = int8_bytes(bert.pooler) if hasattr(bert, "pooler") else 0
    return int8_bytes(bert.embeddings) + int8_bytes(bert.encoder) + pooler + head


def size_parts(model: nn.Module) -> dict[str, dict]:
    """params and int8 flash bytes per part: word embeddings, other embeddings, encoder, head."""
    bert = bert_of(model)
    parts: dict[str, dict] = {}

    def add(name, params, nbytes):
        parts[name] = {"params": int(params), "int8_bytes": int(nbytes)}

    word = bert.embeddings.word_embeddings
    if isinstance(word, CLREmbedding):
        add("word_embeddings (CLR)", word.params(), layout_bytes(word.layout)["total"])
    else:
        add("word_embeddings", word.weight.numel(), word.weight.numel() + 4 * word.weight.shape[0])
    rest = [p for n, p in bert.embeddings.named_parameters() if not n.startswith("word_embeddings")]
    add("position/type embeddings + LayerNorm", sum(p.numel() for p in rest), int8_bytes(bert.embeddings))
    enc = [bert.encoder] + ([bert.pooler] if hasattr(bert, "pooler") else [])
    add("encoder", sum(p.numel() for m in enc for p in m.parameters()), sum(int8_bytes(m) for m in enc))
    if isinstance(model, BertClassifier):
        add("classifier", sum(p.numel() for p in model.classifier.parameters()), int8_bytes(model.classifier))
    add("total", sum(v["params"] for v in parts.values()), sum(v["int8_bytes"] for v in parts.values()))
    return parts


# ---------------------------------------------------------------------------------------------
# budgets

def embedding_budget(model: nn.Module, total_budget: int, unit: str) -> int:
    """What is left for the word table when the rest of the model keeps its size; error if nothing fits."""
    V, d = word_table(model).shape
    fixed = other_params(model) if unit == "params" else other_bytes(model)
    smallest = fixed + min_cost(V, d, Cost(unit))
    if total_budget < smallest:
        what = "parameters" if unit == "params" else "bytes of int8 flash"
        raise TinyshieldError(
            f"budget of {total_budget:,} {what} cannot be met: the weights outside the word embeddings "
            f"alone take {fixed:,} and the smallest CLR table (rank 1) {smallest - fixed:,}; "
            f"the smallest feasible budget is {smallest:,} {what}")
    return total_budget - fixed


# ---------------------------------------------------------------------------------------------
# compress + fine-tune

@dataclass
class Compressed:
    model: nn.Module          # the model with a float CLR word-embedding module
    search: SearchResult
    quant: QuantCLR | None = None
    metrics: dict = field(default_factory=dict)


def check_max_len(max_len: int, rows: int) -> None:
    if max_len < 1:
        raise TinyshieldError(f"max_len must be >= 1, got {max_len}")
    if max_len > rows:
        raise TinyshieldError(f"max_len {max_len} is longer than the model's position table ({rows} rows): "
                              f"give at most {rows}, or leave it out to keep every row")


def truncate_positions(model: nn.Module, max_len: int) -> int:
    """Keep only the first `max_len` rows of the position table (in place); returns the rows before.

    A model deployed at sequence length L never reads position rows >= L, so they are dead weight
    (BERT-tiny: 448 of 512 rows at L = 64, 57,344 parameters). The config follows, so the saved
    model says how long a sequence it accepts and longer inputs are refused with a clear error.
    """
    bert = bert_of(model)
    old = bert.embeddings.position_embeddings
    rows, d = old.weight.shape
    check_max_len(max_len, rows)
    if max_len < rows:
        new = nn.Embedding(max_len, d)
        with torch.no_grad():
            new.weight.copy_(old.weight[:max_len])
        bert.embeddings.position_embeddings = new
        bert.config.max_position_embeddings = max_len
    return rows


def compress(model: nn.Module, weights: np.ndarray, budget: int, unit: str = "params",
             total: bool = True, cands=None, max_len: int | None = None,
             whiten: tuple[torch.Tensor, torch.Tensor] | None = None) -> Compressed:
    """Search a CLR layout within `budget` (of the whole model if `total`, else of the table alone)
    and install its factors in a copy of `model`. With `max_len` the copy's position table is cut
    to that many rows first, so the rows freed go to the word table.

    With `whiten` = (S, S^-1) (see `sensitivity.whitening`) the layout and factors are those of
    E S, the table in the model's sensitivity metric, mapped back by S^-1 on the output side
    (V_c, or the rows of a dense cluster), so the lookup and its cost are unchanged. `cands`
    must then have been built from E S too.
    """
    import copy

    out = copy.deepcopy(model)
    if max_len is not None:
        truncate_positions(out, max_len)
    table = word_table(out)
    target = table if whiten is None else (table.double() @ whiten[0]).float()
    emb_budget = embedding_budget(out, budget, unit) if total else budget
    res = search(target, weights, emb_budget, unit, cands)
    clr = factorize(target, res.layout, torch.as_tensor(weights), res.bases)
    if whiten is not None:
        with torch.no_grad():
            for c, dense in enumerate(res.layout.dense):
                out_side = clr.u[c] if dense else clr.v[c]
                out_side.copy_((out_side.double() @ whiten[1]).float())
    set_word_embeddings(out, clr)
    return Compressed(out, res)


def quantize(c: Compressed) -> Compressed:
    """int8 factors; the model's CLR module is replaced by the exactly dequantised one."""
    emb = bert_of(c.model).embeddings.word_embeddings
    q = QuantCLR.from_float(emb)
    set_word_embeddings(c.model, q.to_float())
    c.quant = q
    return c


def substitute_tokens(contexts: list[np.ndarray], tokens: np.ndarray, n: int,
                      g: np.random.Generator) -> list[np.ndarray]:
    """`n` copies of random `contexts` (token-id sequences of at least 3 ids) with one inner position
    ([CLS] and [SEP] kept) replaced by a random id from `tokens`: new contexts for rare tokens."""
    out = []
    for j in g.integers(0, len(contexts), n):
        s = contexts[j].copy()
        s[g.integers(1, len(s) - 1)] = tokens[g.integers(0, len(tokens))]
        out.append(s)
    return out


def _kl(z: torch.Tensor, zt: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of softened distributions, scaled by T^2 (Hinton et al.)."""
    return temperature ** 2 * F.kl_div(F.log_softmax(z / temperature, -1), F.log_softmax(zt / temperature, -1),
                                       log_target=True, reduction="batchmean")


def finetune_classifier(model: BertClassifier, seqs: list[np.ndarray], labels: np.ndarray, *,
                        teacher: BertClassifier | None = None, steps: int = 800, batch_size: int = 64,
                        lr: float = 5e-4, kd_weight: float = 10.0, temperature: float = 2.0, seed: int = 0,
                        rare_tokens: np.ndarray | None = None, augment_weight: float = 1.0,
                        quiet: bool = True) -> dict:
    """Brief recovery training of a compressed classifier: labels + KL to the uncompressed model,
    and with `rare_tokens` + KL to it on token-substituted copies of the training sequences.

    The KL term dominates (weight 10): matching the original model recovers more than the labels
    do (SST-2 dev at 5.7x: 80.5% with weight 1, 81.0% with 4, 81.2% with 10).

    Why the substituted copies: most of what compression loses sits in the rarely seen tokens
    (BERT-tiny at 5.7x: restoring the exact rows of the 5,937 tokens seen 1-13 times in SST-2 train
    lifts dev accuracy before fine-tuning from 79.8% to 81.7%), and those tokens appear in too few
    training sequences to be fine-tuned. Each step therefore also matches the uncompressed model on
    a batch of training sequences with one token swapped for a random rare one (data augmentation
    for distillation as in TinyBERT), weighted `augment_weight` times the KL term.
    """
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = cosine_warmup(opt, steps, warm=max(1, steps // 10))
    lengths = np.array([len(s) for s in seqs])
    y = torch.from_numpy(labels)
    contexts = [s for s in seqs if len(s) >= 5]  # [CLS] + at least 3 word pieces + [SEP]
    augment = bool(teacher is not None and kd_weight and augment_weight and rare_tokens is not None
                   and len(rare_tokens) and contexts)
    t0 = time.time()
    if teacher is not None:
        teacher.eval()

    def loss_fn(idx):
        ids, mask = pad([seqs[j] for j in idx])
        z = model(ids, mask)
        loss = F.cross_entropy(z, y[idx])
        if teacher is not None and kd_weight:
            with torch.no_grad():
                zt = teacher(ids, mask)
            loss = loss + kd_weight * _kl(z, zt, temperature)
        if augment:
            a_ids, a_mask = pad(substitute_tokens(contexts, rare_tokens, batch_size, g))
            with torch.no_grad():
                zt = teacher(a_ids, a_mask)
            loss = loss + augment_weight * kd_weight * _kl(model(a_ids, a_mask), zt, temperature)
        return loss

    losses = fit(model, opt, sched, endless(lambda: batches(len(seqs), batch_size, lengths, g)), loss_fn, steps,
                 "fine-tune compressed", quiet)
    step = len(losses)
    return {"steps": step, "seconds": round(time.time() - t0, 1), "augmented": augment,
            "first_loss": losses[0] if losses else None, "last_loss": float(np.mean(losses[-20:])) if losses else None}


@torch.no_grad()
def sentence_fidelity(model: BertModel, reference: BertModel, tokenizer, texts: list[str],
                      batch_size: int = 128) -> float:
    """Mean cosine between the sentence embeddings (mean pool) of `model` and `reference`."""
    from edge.models.minilm import tokenize

    total = 0.0
    for i in range(0, len(texts), batch_size):
        b = tokenize(tokenizer, texts[i:i + batch_size])
        a = mean_pool(model(b.input_ids, b.attention_mask), b.attention_mask)
        r = mean_pool(reference(b.input_ids, b.attention_mask), b.attention_mask)
        total += float(F.cosine_similarity(a, r, dim=-1).sum())
    return total / len(texts)


def relative_error(original: torch.Tensor, approx: torch.Tensor, weights: np.ndarray | None = None) -> float:
    """sum_t w_t ||E_t - E^_t||^2 / sum_t w_t ||E_t||^2 (unweighted when `weights` is None)."""
    w = torch.ones(len(original), dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    num = (w[:, None] * (original.double() - approx.double()) ** 2).sum()
    den = (w[:, None] * original.double() ** 2).sum()
    return float(num / den)

"""The whole compression job behind `tinyshield compress`: search, fine-tune, quantise, measure, save."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from edge.compress import model as cm
from edge.compress.clr import layout_bytes, token_cost
from edge.compress.io import save_compressed
from edge.compress.search import token_counts, token_weights
from base.errors import TinyshieldError
from edge.models.bert import BertClassifier, BertModel

FLASH_1MB = 1 << 20


@dataclass
class Report:
    model: str
    budget: int
    unit: str
    layout: dict                 # clusters, ranks, winning assignment, what else was tried
    sizes_before: dict
    sizes_after: dict
    reconstruction: dict         # relative errors of the table (weighted by SST-2 train counts, and plain)
    quality: dict                # accuracy (classifier) or sentence-embedding fidelity (MiniLM)
    lookup_cost: dict            # per token: worst case and token-frequency average
    seconds: float
    positions: dict = field(default_factory=dict)  # position-table rows before/after (`max_len`)
    path: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def recipe_max_len(config: dict) -> int | None:
    """The sequence length a model was trained for, when its config.json records it (recipes do)."""
    recipe = config.get("recipe")
    n = recipe.get("max_len") if isinstance(recipe, dict) else None
    return int(n) if n else None


def sst2_counts(vocab_size: int, train_limit: int | None = None) -> np.ndarray:
    """How often each token occurs in SST-2 train (the only statistics the compression uses)."""
    from base import data

    return token_counts(data.sst2("train").texts[:train_limit], vocab_size)


def sst2_weights(vocab_size: int, train_limit: int | None = None) -> np.ndarray:
    """Token weights from SST-2 train only (its counts, square-rooted; see `search.token_weights`)."""
    return token_weights(sst2_counts(vocab_size, train_limit))


RARE_MAX_COUNT = 60  # tokens seen 1..60 times in SST-2 train get extra fine-tuning contexts


def rare_tokens(counts: np.ndarray, max_count: int = RARE_MAX_COUNT) -> np.ndarray:
    """Ids of tokens seen at least once but at most `max_count` times (see `finetune_classifier`)."""
    return np.flatnonzero((counts >= 1) & (counts <= max_count))


def lookup_summary(layout, weights: np.ndarray) -> dict:
    costs = [token_cost(layout, c) for c in range(len(layout.sizes))]
    w_c = np.array([weights[layout.members(c)].sum() for c in range(len(layout.sizes))])
    w_c = w_c / w_c.sum()
    return {"max_macs": max(c["macs"] for c in costs), "max_bytes_read": max(c["bytes_read"] for c in costs),
            "mean_macs": float(sum(p * c["macs"] for p, c in zip(w_c, costs))),
            "mean_bytes_read": float(sum(p * c["bytes_read"] for p, c in zip(w_c, costs)))}


def eval_seq_len(model: nn.Module, max_len: int | None = None) -> int:
    """Tokens per SST-2 sentence when measuring and fine-tuning: 64 fits them all (the longest dev
    sentence has 57), fewer when the model keeps fewer position rows."""
    return min(64, max_len or cm.bert_of(model).embeddings.position_embeddings.num_embeddings)


def classifier_whitening(model: BertClassifier, seq_len: int = 64, train_limit: int | None = None):
    """(S, S^-1) of the classifier's sensitivity metric on SST-2 train (see `edge.compress.sensitivity`)."""
    from base import data
    from edge.compress.sensitivity import embedding_metric, whitening
    from edge.models.minilm import encode

    return whitening(embedding_metric(model, encode(data.sst2("train").texts[:train_limit], seq_len)))


def compress_model(model: nn.Module, name: str, budget: int, unit: str = "params", *, total: bool = True,
                   finetune_steps: int = 800, int8: bool = True, out: str | Path | None = None,
                   train_limit: int | None = None, dev_limit: int | None = None, quiet: bool = True,
                   cands=None, max_len: int | None = None, augment: float = 1.0,
                   sensitivity: bool = True, whiten=None, counts: np.ndarray | None = None
                   ) -> tuple[Report, cm.Compressed]:
    """Compress `model`'s word table within `budget` and report sizes, errors and quality.

    `max_len` cuts the position table to the sequence length the model is deployed at (rows past it
    are never read); None keeps every row. The freed parameters count towards the word table.
    `augment` weighs the fine-tuning term on sequences with rare tokens substituted in (0 = off).
    `sensitivity`: a classifier's table is rebuilt in its output-sensitivity metric (computed here
    unless `whiten` gives it; `cands`, if given, must come from the whitened table). `counts`: the
    SST-2 train token counts when the caller has them already (a sweep computes them once).

    Classifier: SST-2 dev accuracy of the original, the compressed model before and after
    `finetune_steps` of recovery training (labels + KL to the original), and with int8 factors.
    Bare BERT (MiniLM): mean cosine of sentence embeddings vs the original on SST-2 dev.
    """
    from base import data

    t0 = time.time()
    model = model.eval()
    table = cm.word_table(model)
    counts = counts if counts is not None else sst2_counts(table.shape[0], train_limit)
    weights = token_weights(counts)
    sizes_before = cm.size_parts(model)
    rows_before = cm.bert_of(model).embeddings.position_embeddings.num_embeddings
    cut = copy.deepcopy(model)
    if max_len is not None:
        cm.truncate_positions(cut, max_len)
    if total:
        cm.embedding_budget(cut, budget, unit)  # an infeasible budget fails before the expensive steps
    seq_len = eval_seq_len(model, max_len)
    if sensitivity and whiten is None and isinstance(model, BertClassifier):
        whiten = classifier_whitening(model, seq_len, train_limit)
    comp = cm.compress(cut, weights, budget, unit, total=total, cands=cands, whiten=whiten)
    positions = {"rows_before": rows_before, "rows_after": cm.bert_of(comp.model).config.max_position_embeddings}
    clr = cm.bert_of(comp.model).embeddings.word_embeddings
    recon = {"weighted_rel_error": cm.relative_error(table, clr.table(), weights),
             "rel_error": cm.relative_error(table, clr.table())}
    if whiten is not None:  # what the search minimised: the error in the model's sensitivity metric
        recon["sensitivity_weighted_rel_error"] = comp.search.rel_error
    dev = data.sst2("dev")
    dev_texts, dev_labels = dev.texts[:dev_limit], dev.labels[:dev_limit]
    quality: dict = {}
    notes: list[str] = []

    if isinstance(model, BertClassifier):
        from edge.models.minilm import encode
        from edge.train import accuracy, predict

        dev_seqs = encode(dev_texts, seq_len)
        quality["original_accuracy"] = accuracy(model, dev_seqs, dev_labels)
        quality["compressed_accuracy"] = accuracy(comp.model, dev_seqs, dev_labels)
        if finetune_steps:
            tr = data.sst2("train")
            seqs = encode(tr.texts[:train_limit], seq_len)
            quality["finetune"] = cm.finetune_classifier(comp.model, seqs, tr.labels[:train_limit],
                                                         teacher=model, steps=finetune_steps, quiet=quiet,
                                                         rare_tokens=rare_tokens(counts), augment_weight=augment)
            quality["finetuned_accuracy"] = accuracy(comp.model, dev_seqs, dev_labels)
        best = quality.get("finetuned_accuracy", quality["compressed_accuracy"])
        if int8:
            cm.quantize(comp)
            quality["int8_clr_accuracy"] = accuracy(comp.model, dev_seqs, dev_labels)
            best = quality["int8_clr_accuracy"]
        quality["accuracy"] = best
        quality["agreement"] = float((predict(comp.model, dev_seqs) == predict(model, dev_seqs)).mean())
        quality["drop_points"] = 100 * (quality["original_accuracy"] - best)
        quality["dev_sentences"] = len(dev_seqs)
    elif isinstance(model, BertModel):
        from edge.models.minilm import load_tokenizer

        tok = load_tokenizer()
        quality["fidelity"] = cm.sentence_fidelity(comp.model, model, tok, dev_texts)
        if int8:
            cm.quantize(comp)
            quality["int8_fidelity"] = cm.sentence_fidelity(comp.model, model, tok, dev_texts)
        quality["dev_sentences"] = len(dev_texts)
        notes.append("fidelity = mean cosine of mean-pooled sentence embeddings vs the original, SST-2 dev")
    else:
        raise TinyshieldError(f"cannot compress a {type(model).__name__}")

    if int8 and comp.quant is not None:
        recon["int8_weighted_rel_error"] = cm.relative_error(table, comp.quant.table(), weights)
    clr = cm.bert_of(comp.model).embeddings.word_embeddings
    lay = clr.layout
    layout = {"candidate": comp.search.candidate, "tried": comp.search.tried,
              "metric": "sensitivity" if whiten is not None else "euclidean",
              "clusters": [{"rows": n, "rank": r, "dense": dn} for n, r, dn in zip(lay.sizes, lay.ranks, lay.dense)],
              "params": lay.params(), "int8_bytes": layout_bytes(lay), "cost": comp.search.cost}
    report = Report(name, budget, unit, layout, sizes_before, cm.size_parts(comp.model), recon, quality,
                    lookup_summary(lay, weights), round(time.time() - t0, 1), positions, notes=notes)
    if out is not None:
        report.path = str(save_compressed(comp.model, comp.quant, out, {"report": report.to_dict()}))
    return report, comp

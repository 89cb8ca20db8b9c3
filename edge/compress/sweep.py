"""Sweeps of compression settings as Ray Tune trials: table, JSON and a Pareto plot.

    res = compress_sweep(model, "bert-tiny-sst2", [768 << 10, 1 << 20], "bytes", out_dir)
    res.pareto                       # no other trial is smaller in flash and more faithful at once

One trial is one `compress_model` run (edge/compress/pipeline.py) for one budget, one cluster
layout ("bands8", "bands16-kmeans4", or "search": the whole candidate family) and one metric
(the classifier's sensitivity metric or plain euclidean), measured cheaply on a slice of SST-2
dev: a classifier's agreement with the uncompressed model (and its accuracy), a bare BERT's
sentence-embedding cosine. The statistics every trial shares (token counts, the sensitivity
whitening) are computed once by the driver and reach the trials through Ray's object store. A
trial's result is cached under the build dir, keyed by the model, the statistics, the settings,
the compression code and its own configuration, so a repeated or widened sweep runs only the new
trials. Fine-tuning is off by default (minutes a trial); --finetune-steps turns it on.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from base.errors import TinyshieldError
from edge.compress import model as cm

LAYOUTS = ("bands1", "bands8", "bands16-kmeans4")
METRICS = ("sensitivity", "euclidean")
HINT = "or drop --sweep to compress to one budget"


@dataclass
class CompressTrial:
    budget: int
    unit: str                     # "bytes" (int8 flash) or "params"
    layout: str                   # cluster layout asked for ("search" = the best of the candidate family)
    metric: str                   # "sensitivity" or "euclidean"
    flash_bytes: int              # int8 bytes of the whole compressed model
    params: int                   # parameters of the whole compressed model
    table_bytes: int              # int8 bytes of the CLR word table (factors, scales, index)
    candidate: str                # the cluster assignment used
    clusters: int
    fidelity: float               # classifier: prediction agreement with the original; BERT: mean cosine
    accuracy: float | None        # classifier: SST-2 dev accuracy on the slice
    rel_error: float              # frequency-weighted relative error of the table
    seconds: float                # the trial's own compute time (0 when cached)
    cached: bool = False

    @property
    def label(self) -> str:
        return f"{self.layout}/{self.metric}@{self.budget:,}"


@dataclass
class CompressSweep:
    model: str
    fidelity: str                 # what `fidelity` measures
    original_accuracy: float | None
    settings: dict                # what every trial shares (slices, fine-tuning, int8, max_len)
    trials: list[CompressTrial]
    pareto: list[CompressTrial]   # fewest flash bytes for their fidelity
    seconds: float                # wall time of the Tune run
    out_dir: str
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pareto"] = [t.label for t in self.pareto]
        return d


def compress_space(budgets: list[int], unit: str, layouts=LAYOUTS, metrics=("sensitivity",),
                   total: bool = True) -> list[dict]:
    """The configurations of a compression sweep: budgets x cluster layouts x metrics."""
    from edge.compress.search import parse_layout
    if not budgets:
        raise TinyshieldError("a compression sweep needs at least one budget")
    for name in layouts:
        if name != "search":
            parse_layout(name)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise TinyshieldError(f"metrics {bad}: choose from {', '.join(METRICS)}")
    return [{"budget": int(b), "unit": unit, "total": total, "layout": lay, "metric": m}
            for b in budgets for lay in layouts for m in metrics]


def fingerprint(obj) -> str:
    """Content hash of a model (its state dict) or an array: part of a trial's cache key."""
    h = hashlib.sha256()
    if isinstance(obj, nn.Module):
        for k, v in sorted(obj.state_dict().items()):
            h.update(k.encode() + b"\0" + v.detach().cpu().contiguous().numpy().tobytes())
    else:
        h.update(np.ascontiguousarray(obj).tobytes())
    return h.hexdigest()[:16]


def compress_trial(config: dict, model=None, name: str = "", counts=None, whiten=None, settings=None,
                   key=None, cache_dir: str = "") -> dict:
    """One Tune trial (runs in a Ray worker): compress with one configuration and measure it; from the
    cache when this configuration of this model was measured before."""
    from base.paths import config_hash
    from edge.compress.pipeline import compress_model
    from edge.compress.search import candidates, parse_layout, token_weights

    path = Path(cache_dir) / f"{config_hash({**key, 'trial': config})}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "seconds": 0.0, "cached": True}
    torch.set_num_threads(settings["threads"])
    t0 = time.process_time()
    sensitivity = config["metric"] == "sensitivity" and whiten is not None
    cands = None
    if config["layout"] != "search":
        bands, parts = parse_layout(config["layout"])
        table = cm.word_table(model)
        target = (table.double() @ whiten[0]).float() if sensitivity else table
        cands = candidates(target.numpy(), token_weights(counts), bands=(bands,), splits=(parts,))
    report, _ = compress_model(model, name, config["budget"], config["unit"], total=config["total"],
                               finetune_steps=settings["finetune_steps"], int8=settings["int8"],
                               train_limit=settings["train_limit"], dev_limit=settings["dev_limit"], cands=cands,
                               max_len=settings["max_len"], augment=settings["augment"], sensitivity=sensitivity,
                               whiten=whiten if sensitivity else None, counts=counts)
    q, lay = report.quality, report.layout
    classifier = "agreement" in q
    rel = report.reconstruction
    out = {"flash_bytes": report.sizes_after["total"]["int8_bytes"], "params": report.sizes_after["total"]["params"],
           "table_bytes": lay["int8_bytes"]["total"], "candidate": lay["candidate"], "clusters": len(lay["clusters"]),
           "fidelity": q["agreement"] if classifier else q.get("int8_fidelity", q["fidelity"]),
           "accuracy": q["accuracy"] if classifier else None,
           "original_accuracy": q.get("original_accuracy"),
           "rel_error": rel.get("int8_weighted_rel_error", rel["weighted_rel_error"]),
           "seconds": time.process_time() - t0, "cached": False}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)                 # atomic: trials of parallel sweeps may share the cache
    return out


def compress_sweep(model: nn.Module, name: str, budgets: list[int], unit: str, out_dir: str | Path, *,
                   total: bool = True, layouts=LAYOUTS, metrics=("sensitivity",), finetune_steps: int = 0,
                   dev_limit: int = 256, train_limit: int | None = 2000, max_len: int | None = None,
                   int8: bool = True, augment: float = 1.0, address: str | None = None,
                   max_concurrent: int | None = None, threads: int = 1) -> CompressSweep:
    """Run every budget x layout x metric as a Tune trial on the local cores (or the cluster at
    `address`) and write trials.json, table.md and pareto.png into out_dir. `train_limit` SST-2 train
    sentences give the sensitivity metric (and the fine-tuning data); the token counts come from
    all of SST-2 train, as in `tinyshield compress`."""
    from base import data
    from base.cluster import require_ray, run_trials
    from base.paths import build_dir, config_hash, files_hash
    from edge.compress.pipeline import classifier_whitening, eval_seq_len, sst2_counts
    from edge.models.bert import BertClassifier

    require_ray(HINT)                           # before the statistics, not after them
    if not isinstance(model, BertClassifier):
        metrics = ("euclidean",)                # the sensitivity metric is a classifier's
    space = compress_space(budgets, unit, layouts, metrics, total)
    model = model.eval()
    if total:                                   # an infeasible budget fails before Ray starts
        cut = copy.deepcopy(model)
        if max_len is not None:
            cm.truncate_positions(cut, max_len)
        for budget in budgets:
            cm.embedding_budget(cut, budget, unit)
    counts = sst2_counts(cm.word_table(model).shape[0])
    whiten = None
    if "sensitivity" in metrics and isinstance(model, BertClassifier):
        whiten = classifier_whitening(model, eval_seq_len(model, max_len), train_limit)
    settings = {"finetune_steps": finetune_steps, "dev_limit": dev_limit, "train_limit": train_limit,
                "max_len": max_len, "int8": int8, "augment": augment, "threads": threads}
    dev = data.sst2("dev").texts[:dev_limit]
    key = {"model": fingerprint(model), "counts": fingerprint(counts),
           "whiten": fingerprint(whiten[0].numpy()) if whiten is not None else None,
           "dev": config_hash(dev), "settings": {k: v for k, v in settings.items() if k != "threads"},
           "code": files_hash((Path(__file__).parent).glob("*.py")), "version": 1}
    results, seconds = run_trials(compress_trial, space, out_dir, metric="fidelity", mode="max", address=address,
                                  cpus_per_trial=threads, max_concurrent=max_concurrent, hint=HINT,
                                  model=model, name=name, counts=counts, whiten=whiten, settings=settings, key=key,
                                  cache_dir=str(build_dir() / "sweeps" / "compress-trials"))
    fields = set(CompressTrial.__dataclass_fields__)
    trials = [CompressTrial(**{k: v for k, v in {**c, **m}.items() if k in fields}) for c, m in results]
    classifier = isinstance(model, BertClassifier)
    out = Path(out_dir).resolve()
    res = CompressSweep(name, "agreement with the uncompressed model's predictions" if classifier
                        else "mean cosine of sentence embeddings vs the uncompressed model",
                        results[0][1].get("original_accuracy"), {**settings, "dev_sentences": len(dev)}, trials,
                        pareto(trials), seconds, str(out))
    res.files = {"json": str(out / "trials.json"), "table": str(out / "table.md"), "plot": str(out / "pareto.png")}
    Path(res.files["json"]).write_text(json.dumps(res.to_dict(), indent=1))
    Path(res.files["table"]).write_text(markdown_table(res))
    plot_pareto(res, res.files["plot"])
    return res


def pareto(trials: list[CompressTrial]) -> list[CompressTrial]:
    from base.cluster import pareto_front
    return pareto_front(trials, key=lambda t: (t.flash_bytes, -t.fidelity))


def _rows(res: CompressSweep):
    front = {id(t) for t in res.pareto}
    for t in res.pareto + [x for x in res.trials if id(x) not in front]:
        acc = "-" if t.accuracy is None else f"{100 * t.accuracy:.1f}"
        yield (t.layout + (" *" if id(t) in front else ""), t.metric, f"{t.budget:,} {t.unit}", f"{t.flash_bytes:,}",
               f"{t.table_bytes:,}", f"{t.candidate} ({t.clusters})", f"{t.rel_error:.4f}", f"{t.fidelity:.4f}", acc,
               "cached" if t.cached else f"{t.seconds:.1f}")


COLUMNS = ("layout", "metric", "budget", "flash B", "word table B", "clusters used", "table error", "fidelity",
           "accuracy %", "trial s")


def _title(res: CompressSweep) -> str:
    orig = "" if res.original_accuracy is None else f"; uncompressed accuracy {100 * res.original_accuracy:.1f} %"
    return (f"compress sweep: {res.model}, {len(res.trials)} trials on {res.settings['dev_sentences']} SST-2 dev "
            f"sentences{orig}; fidelity = {res.fidelity}; * = Pareto front (flash bytes, fidelity)")


def markdown_table(res: CompressSweep) -> str:
    lines = [f"# {_title(res)}", "", f"{len(res.trials)} Ray Tune trials in {res.seconds:.1f} s; fine-tuning "
             f"{res.settings['finetune_steps']} steps; {'int8' if res.settings['int8'] else 'float32'} factors", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(res)]
    return "\n".join(lines) + "\n"


def rich_table(res: CompressSweep):
    from rich.table import Table
    t = Table(title=_title(res))
    for i, col in enumerate(COLUMNS):
        t.add_column(col, justify="left" if i < 2 else "right")
    for r in _rows(res):
        t.add_row(*r)
    return t


def plot_pareto(res: CompressSweep, path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from base.cluster import plot_front, save_figure

    panels = [("fidelity", lambda t: t.fidelity, res.fidelity)]
    if res.original_accuracy is not None:
        panels.append(("accuracy", lambda t: 100 * t.accuracy, "SST-2 dev accuracy (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    front = sorted(res.pareto, key=lambda t: t.flash_bytes)
    for ax, (_, get, label) in zip(axes[0], panels):
        for lay in dict.fromkeys(t.layout for t in res.trials):
            for metric, marker in zip(METRICS, ("o", "s")):
                pts = [t for t in res.trials if t.layout == lay and t.metric == metric]
                if pts:
                    ax.scatter([t.flash_bytes / 1024 for t in pts], [get(t) for t in pts], marker=marker, alpha=0.6,
                               label=f"{lay} ({metric})")
        plot_front(ax, front, lambda t: t.flash_bytes / 1024, get)
        if label.startswith("SST-2") and res.original_accuracy is not None:
            ax.axhline(100 * res.original_accuracy, color="r", linestyle="--", label="uncompressed")
        ax.set_xlabel("flash, int8 model (KiB)")
        ax.set_ylabel(label if len(label) < 40 else "fidelity")
        ax.legend(fontsize=7)
    save_figure(fig, path, f"{res.model}: fidelity vs flash ({len(res.trials)} trials, "
                           f"{res.settings['dev_sentences']} dev sentences)")

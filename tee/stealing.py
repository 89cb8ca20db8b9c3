"""Model confidentiality, measured: model stealing and membership inference against a protected classifier.

Stealing (TEESlice's threat model). The thief holds the public backbone (all-MiniLM-L6-v2) and everything the
accelerator held: it queries the protected model on N inputs, labels them with its answers, and trains a copy. Its
backbone is the public one with every layer it can recover from the accelerator's model file put in (the mode's
`recover` hook: weights in the clear, ShadowNet's matched rows, int8 rows rescaled by the public ones); a head it
recovers in the clear is kept when it agrees better with the victim on the thief's own queries. What the
accelerator received (the transcript) adds nothing here: in the blinded and sliced modes it is uniform field
elements (tee.audit.transcript_report). The black-box baseline: the same queries and training from the public
backbone alone. Two thieves: `probe`, a logistic regression on the frozen backbone's mean-pooled features (cheap),
and `finetune`, the whole model -- backbone and head -- fine-tuned on the labelled queries (TEESlice's attack), a
bounded budget of FINETUNE_PASSES sentence passes (at least one epoch); its predictions are cached under
build/steal/ by the hash of its inputs (initial weights, queries, answers, budget). A thief whose starting point
is the public backbone itself (sliced, enclave-only) is the black-box thief: same inputs, same cached result.

Membership inference: the confidence-threshold attack (Yeom et al.): "member" when the victim's probability for
the true label exceeds a threshold, chosen on one half of the members and non-members, scored (balanced accuracy)
on the other half.

The victim's answers are computed here with its fp32 model in batches, a stand-in for querying the protected
session (which returns the fixed-point version of the same model, one request at a time); how often the two
argmaxes differ is not measured yet.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from edge.capture import where


@dataclass
class Theft:
    mode: str
    n: int                       # queries
    victim_accuracy: float
    stolen_accuracy: float       # thief with the accelerator's view
    stolen_agreement: float      # share of evaluation inputs where the stolen model answers as the victim
    blackbox_accuracy: float     # thief with the same queries, no accelerator view
    blackbox_agreement: float
    layers_recovered: int        # outsourced layers the thief put into its backbone
    head_recovered: bool
    attack: str = "probe"        # probe: logistic head on the frozen backbone; finetune: the whole model trained


@dataclass
class Membership:
    mode: str
    members: int
    nonmembers: int
    balanced_accuracy: float     # on the held-out half, threshold from the other half (0.5 = chance)
    auc: float


@torch.no_grad()
def features(model, texts: list[str], max_len: int = 64, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(mean-pooled last hidden states, logits) of a BertClassifier-shaped model, sorted-length batches."""
    from edge.models.minilm import encode
    from edge.train import logits, pad
    model.eval()
    seqs = encode(texts, max_len)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    pooled = np.zeros((len(texts), model.config.hidden_size), np.float32)
    out = np.zeros((len(texts), model.num_labels), np.float32)
    for i in range(0, len(texts), batch):
        idx = order[i:i + batch]
        ids, mask = pad([seqs[j] for j in idx])
        z, p = logits(model, ids, mask, return_pooled=True)
        out[idx], pooled[idx] = z.numpy(), p.numpy()
    return pooled, out


def module_path(node) -> str:
    """The module a linear node belongs to, as the plain classifier names it (a sliced model's public `base`)."""
    return where(node).module.removesuffix(".base")


def public_layers(prog, public_state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The public model's weights of every outsourced layer of `prog` that it has (fused layers concatenated)."""
    out = {}
    for name, layer in prog.layers.items():
        keys = [f"{module_path(n)}.weight" for n in layer.nodes]
        if all(k in public_state and public_state[k].ndim == 2 for k in keys):
            w = torch.cat([public_state[k] for k in keys]).numpy()
            if w.shape == layer.w.shape:
                out[name] = w
    return out


def thief_model(public, prog, recovered: dict[str, np.ndarray]):
    """A BertClassifier on the public backbone with the recovered layers put in (the head too, if recovered)."""
    import copy
    model = copy.deepcopy(public)
    state = model.state_dict()
    for name, w in recovered.items():
        layer = prog.layers[name]
        for n in layer.nodes:
            cols = prog.member[n.name][1]
            key = f"{module_path(n)}.weight"
            if key in state and state[key].shape == w[cols].shape:
                state[key] = torch.from_numpy(np.ascontiguousarray(w[cols], dtype=np.float32))
    model.load_state_dict(state)
    return model


def fit_head(x: np.ndarray, y: np.ndarray):
    """Logistic regression; with a single class among the answers, a constant predictor."""
    from sklearn.linear_model import LogisticRegression
    if len(np.unique(y)) < 2:
        return lambda f: np.full(len(f), y[0])
    clf = LogisticRegression(C=1.0, max_iter=500).fit(x, y)
    return clf.predict


def steal(mode: str, victim, prog, accel: dict[str, np.ndarray], public, queries: list[str],
          eval_texts: list[str], eval_labels: np.ndarray, ns=(50, 500, 5000), max_len: int = 64,
          cache: dict | None = None) -> list[Theft]:
    """Model stealing against `victim` (the protected model, fp32) in `mode`, for each query budget in `ns`.
    `public`: the thief's BertClassifier on the public backbone (its head untrained); `prog`: the protected graph.
    `cache`: shared between calls on the same queries, keeps the victim's and the public model's features."""
    cache = {} if cache is None else cache

    def feats(model, texts, role):
        key = (role, id(model), len(texts))
        if key not in cache:
            cache[key] = features(model, texts, max_len)
        return cache[key]

    from tee.modes import get
    how = get(mode)
    pub_state = public.state_dict()
    recovered = how.recover(accel, public_layers(prog, pub_state)) if accel else {}
    head_name = next((n for n, layer in prog.layers.items()
                      if any(module_path(x) == "classifier" for x in layer.nodes)), None)
    head = recovered.get(head_name) if mode == "plain" else None      # only in the clear is a head usable as is
    thief = thief_model(public, prog, {n: w for n, w in recovered.items() if n != head_name})
    n_max = min(max(ns), len(queries))
    _, v_q = feats(victim, queries[:n_max], "queries")
    _, v_e = feats(victim, eval_texts, "eval")
    y_q, y_e = v_q.argmax(1), v_e.argmax(1)
    f_pub_q, f_pub_e = feats(public, queries[:n_max], "queries")[0], feats(public, eval_texts, "eval")[0]
    f_thief_q, f_thief_e = (features(thief, queries[:n_max], max_len)[0], features(thief, eval_texts, max_len)[0]) \
        if recovered else (f_pub_q, f_pub_e)
    victim_acc = float((y_e == eval_labels).mean())
    out = []
    for n in ns:
        n = min(n, n_max)
        pred_bb = fit_head(f_pub_q[:n], y_q[:n])(f_pub_e)
        pred = fit_head(f_thief_q[:n], y_q[:n])(f_thief_e)
        recovered_head = False
        if head is not None:     # its bias stays in the enclave: the thief uses none
            fitted = fit_head(f_thief_q[:n], y_q[:n])
            if ((f_thief_q[:n] @ head.T).argmax(1) == y_q[:n]).mean() >= (fitted(f_thief_q[:n]) == y_q[:n]).mean():
                pred, recovered_head = (f_thief_e @ head.T).argmax(1), True
        out.append(Theft(mode, n, victim_acc, float((pred == eval_labels).mean()), float((pred == y_e).mean()),
                         float((pred_bb == eval_labels).mean()), float((pred_bb == y_e).mean()),
                         len([k for k in recovered if k != head_name]), recovered_head))
    return out


FINETUNE_PASSES = 1500     # sentence passes of a fine-tuning thief with few queries (10 epochs of 50, 3 of 500)
FINETUNE_LR = 5e-5         # the full fine-tuning recipe's (edge.recipes.minilm_task)


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode() + a.tobytes())
    return h.hexdigest()[:16]


def finetuned_predictions(init, texts: list[str], answers: np.ndarray, eval_texts: list[str], max_len: int = 64,
                          batch_size: int = 32, seed: int = 0, passes: int = FINETUNE_PASSES) -> np.ndarray:
    """The thief's model -- `init` (a BertClassifier) with every parameter trained on `texts` labelled `answers`,
    max(1, passes // n) epochs -- and its answers on `eval_texts`. Cached by the inputs' hash."""
    import copy
    import json

    from base.paths import build_dir, config_hash
    from edge.models.minilm import encode
    from edge.train import batches, cosine_warmup, endless, fit, logits, pad
    from torch.nn import functional as F
    n = len(texts)
    epochs = max(1, passes // n)
    steps = epochs * math.ceil(n / batch_size)
    state = init.state_dict()
    key = {"init": digest(*[state[k].numpy() for k in sorted(state)]),
           "queries": hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16], "answers": digest(answers),
           "eval": hashlib.sha256("\0".join(eval_texts).encode()).hexdigest()[:16], "steps": steps,
           "batch": batch_size, "lr": FINETUNE_LR, "max_len": max_len, "seed": seed, "version": 1}
    out = build_dir() / "steal" / config_hash(key)
    if (out / "predictions.npy").is_file():
        return np.load(out / "predictions.npy")
    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    model = copy.deepcopy(init)
    seqs = encode(texts, max_len)
    y = torch.from_numpy(np.asarray(answers, np.int64))
    lengths = np.array([len(q) for q in seqs])
    opt = torch.optim.AdamW(model.parameters(), lr=FINETUNE_LR, weight_decay=0.01)
    sched = cosine_warmup(opt, steps, warm=max(1, steps // 10))

    def loss_fn(idx):
        ids, mask = pad([seqs[j] for j in idx])
        return F.cross_entropy(logits(model, ids, mask), y[idx])

    fit(model, opt, sched, endless(lambda: batches(n, batch_size, lengths, g)), loss_fn, steps, "thief", quiet=True)
    pred = features(model, eval_texts, max_len)[1].argmax(1)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "predictions.tmp.npy"
    np.save(tmp, pred)
    (out / "key.json").write_text(json.dumps(key))
    tmp.rename(out / "predictions.npy")
    return pred


def steal_finetune(mode: str, victim, prog, accel: dict[str, np.ndarray], public, queries: list[str],
                   eval_texts: list[str], eval_labels: np.ndarray, ns=(50, 500, 5000), max_len: int = 64,
                   passes: int = FINETUNE_PASSES) -> list[Theft]:
    """Model stealing by fine-tuning: the thief trains its whole model (the public backbone with what it recovered
    from the accelerator's file put in, a recovered head as the head's start) on N queries labelled by the victim;
    the black-box thief trains the public model on the same queries."""
    from tee.blinded import quantize_weights
    from tee.modes import get
    pub = public_layers(prog, public.state_dict())
    recovered = get(mode).recover(accel, pub) if accel else {}
    # a layer whose int8 codes are exactly the quantised public weights tells the thief nothing it lacks (sliced):
    # it keeps the public fp32 weights there
    recovered = {n: w for n, w in recovered.items() if not (n in pub and accel[n].dtype == np.int8 and
                                                             np.array_equal(accel[n].T, quantize_weights(pub[n])[0]))}
    head_name = next((n for n, layer in prog.layers.items()
                      if any(module_path(x) == "classifier" for x in layer.nodes)), None)
    thief = thief_model(public, prog, {n: w for n, w in recovered.items() if n != head_name})
    head = recovered.get(head_name) if mode == "plain" else None
    if head is not None and head.shape == tuple(thief.classifier.weight.shape):
        with torch.no_grad():
            thief.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(head, np.float32)))
    n_max = min(max(ns), len(queries))
    y_q = features(victim, queries[:n_max], max_len)[1].argmax(1)
    y_e = features(victim, eval_texts, max_len)[1].argmax(1)
    out = []
    for n in ns:
        n = min(n, n_max)
        pred_bb = finetuned_predictions(public, queries[:n], y_q[:n], eval_texts, max_len, passes=passes)
        pred = finetuned_predictions(thief, queries[:n], y_q[:n], eval_texts, max_len, passes=passes)
        out.append(Theft(mode, n, float((y_e == eval_labels).mean()), float((pred == eval_labels).mean()),
                         float((pred == y_e).mean()), float((pred_bb == eval_labels).mean()),
                         float((pred_bb == y_e).mean()), len([k for k in recovered if k != head_name]),
                         head is not None, attack="finetune"))
    return out


def membership(mode: str, victim, members: list[str], labels_in: np.ndarray, nonmembers: list[str],
               labels_out: np.ndarray, max_len: int = 64, seed: int = 0) -> Membership:
    from sklearn.metrics import roc_auc_score

    def confidence(texts, labels):
        z = features(victim, texts, max_len)[1].astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True))[np.arange(len(texts)), labels]

    s_in, s_out = confidence(members, labels_in), confidence(nonmembers, labels_out)
    rng = np.random.default_rng(seed)
    i_in, i_out = rng.permutation(len(s_in)), rng.permutation(len(s_out))
    fit_in, test_in = s_in[i_in[: len(s_in) // 2]], s_in[i_in[len(s_in) // 2:]]
    fit_out, test_out = s_out[i_out[: len(s_out) // 2]], s_out[i_out[len(s_out) // 2:]]

    def balanced(t, a, b):
        return ((a > t).mean() + (b <= t).mean()) / 2

    cands = np.unique(np.concatenate([fit_in, fit_out]))
    t = max(cands, key=lambda c: balanced(c, fit_in, fit_out)) if len(cands) else 0.5
    auc = float(roc_auc_score(np.r_[np.ones(len(s_in)), np.zeros(len(s_out))], np.r_[s_in, s_out]))
    return Membership(mode, len(members), len(nonmembers), float(balanced(t, test_in, test_out)), auc)

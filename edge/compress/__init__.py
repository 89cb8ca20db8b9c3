"""Compression of tiny BERTs: clustered low-rank (CLR) word embeddings under a budget.

Modules: `clr` (the table, its int8 form, per-token cost), `search` (budgeted cluster and rank
search), `model` (install into a BERT, fine-tune, sizes), `io` (the file format below), `pipeline`
(the whole `tinyshield compress` job), `sweep` (many such jobs as Ray Tune trials).

On-disk format (version 1) — a directory with `config.json` and `model.safetensors`
-------------------------------------------------------------------------------------
config.json:
    "kind": "bert-classifier-clr" (BertClassifier) or "bert-clr" (BertModel, e.g. MiniLM)
    "model": the BertConfig dict; "num_labels" for classifiers
    "word_embeddings": {
        "format": "tinyshield-clr", "version": 1,
        "dtype": "int8" | "float32",
        "vocab_size": V, "dim": d,
        "clusters": [{"start": s_c, "rows": n_c, "rank": r_c, "dense": bool}, ...],   # slot order
        "params": factor values, "int8_bytes": {"factors", "scales", "index", "total"} }
    plus a "report" (sizes, errors, accuracy) written by `tinyshield compress`.

model.safetensors:
    every tensor of the model under its usual name (`bert.encoder.layer.0...`, `bert.embeddings.
    position_embeddings.weight`, `classifier.weight`, ...) EXCEPT the word table, and:
    clr.slot         int32 (V,)        slot of each token id; cluster c owns slots [s_c, s_c + n_c)
    clr.{c}.u        int8 (n_c, r_c)   one row per token of the cluster (row i = slot - s_c)
    clr.{c}.u_scale  float32 (n_c,)    per-row scale of u
    clr.{c}.v        int8 (r_c, d)     the cluster's basis            (absent when dense)
    clr.{c}.v_scale  float32 (d,)      per-output-column scale of v   (absent when dense)
    A dense cluster stores its rows directly: u is (n_c, d) and there is no v.
    With dtype "float32" u and v are float32 and there are no scales.

Lookup of token t (int8):
    s = slot[t]; c = the cluster with s_c <= s < s_c + n_c; i = s - s_c
    low-rank: acc[j] = sum_k u[c][i,k] * v[c][k,j]  (int32, r_c MACs per output, r_c*d in all)
              e[j]   = acc[j] * u_scale[c][i] * v_scale[c][j]
    dense:    e[j]   = u[c][i,j] * u_scale[c][i]
    Cost per token: low-rank reads r_c + r_c*d bytes (+ scales) and does r_c*d MACs; dense reads d
    bytes and does none. On an MCU the slot table can be narrowed to uint16 when V <= 65536
    (that is what `int8_bytes["index"]` counts), and the cluster found by comparing s to the
    few starts.
"""

"""bert-tiny-sst2 recipe: a few steps of the real pipeline on a small config, caching, PCA start."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edge.models.bert import BertClassifier, BertConfig
from edge.models.registry import load_dir
from edge.recipes import recipes
from edge.models.minilm import encode
from edge.recipes.bert_tiny_sst2 import pca_init
from edge.train import accuracy

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)


@pytest.mark.slow
def test_recipe_trains_saves_and_caches(shared_data, build_tmp):
    from base import data

    train = recipes()["bert-tiny-sst2"]
    kw = dict(model=BertConfig(**SMALL), train_limit=256, max_steps=6, batch_size=32, threads=1, quiet=True)
    r = train(**kw)
    assert not r.cached and (r.path / "model.safetensors").is_file()
    m = r.metrics
    assert m["steps"] == 6 and m["train_sentences"] == 256 and m["dev_sentences"] == 872
    assert 0.0 <= m["dev_accuracy"] <= 1.0 and 0.5 <= m["teacher_dev_accuracy"] <= 1.0
    loaded = load_dir(r.path)
    assert loaded.kind == "bert-classifier" and loaded.config["num_labels"] == 2
    dev = data.sst2("dev")
    assert accuracy(loaded.model, encode(dev.texts, 64), dev.labels) == m["dev_accuracy"]
    again = train(**kw)
    assert again.cached and again.path == r.path and again.metrics == m


def test_pca_init_keeps_minilm_geometry():
    from edge.models.minilm import load_minilm

    # At full width the PCA projection is a rotation: distances between tokens are unchanged.
    cfg = BertConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
    student = BertClassifier(cfg, 2)
    pca_init(student)
    ids = torch.tensor([1996, 2204, 2919, 3376, 6659, 102, 101])  # the good bad beautiful awful [SEP] [CLS]
    ref = load_minilm().embeddings.word_embeddings.weight.detach()[ids]
    got = student.bert.embeddings.word_embeddings.weight.detach()[ids]
    torch.testing.assert_close(torch.cdist(got, got), torch.cdist(ref, ref), atol=1e-4, rtol=1e-4)
    # At d = 32 the first coordinate carries the most variance of the whole table.
    small = BertClassifier(BertConfig(**SMALL), 2)
    pca_init(small)
    var = small.bert.embeddings.word_embeddings.weight.detach().var(0).numpy()
    assert np.argmax(var) == 0 and np.all(np.diff(var[:8]) <= 1e-6)

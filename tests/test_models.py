"""Real weights: MiniLM loads under HF names and reproduces sentence-transformers; bad files fail clearly."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from base.errors import TinyshieldError
from edge.models.bert import BertClassifier, BertConfig, BertModel
from edge.models.io import load_into, read_safetensors, save_model
from edge.models.minilm import SentenceEncoder, load_minilm, load_tokenizer, minilm_dir, tokenize
from edge.models.registry import load_dir

REF = Path(__file__).parent / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


def test_minilm_matches_sentence_transformers(encoder):
    ref = np.load(REF)
    ours = encoder.encode([str(t) for t in ref["texts"]])
    assert ours.shape == ref["emb"].shape == (8, 384)
    assert np.abs(ours - ref["emb"]).max() <= 1e-5


def test_minilm_uses_hf_parameter_names():
    ckpt = read_safetensors(minilm_dir() / "model.safetensors")
    model = load_minilm()
    own = set(model.state_dict())
    assert own <= set(ckpt)
    assert "encoder.layer.5.attention.self.query.weight" in own
    assert set(ckpt) - own == {k for k in ckpt if k.startswith(("pooler.", "embeddings.position_ids"))}


def test_embeddings_are_normalised_and_padding_invariant(encoder):
    texts = ["a gorgeous , witty , seductive movie .", "bad"]
    batch = encoder.encode(texts)
    single = np.concatenate([encoder.encode([t]) for t in texts])
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-6)
    assert np.abs(batch - single).max() < 1e-5  # padding the short sentence changes nothing


def test_tokenizer_round_trip():
    tok = load_tokenizer()
    text = "a charming and often unflinchingly affecting journey"
    enc = tok.encode(text)
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert tok.decode(enc.ids) == text
    b = tokenize(tok, [text, "hi"], pad_to=16)
    assert b.input_ids.shape == (2, 16)
    assert b.attention_mask[1].sum() == 3 and (b.input_ids[1, 3:] == 0).all()


def test_missing_weights_file(tmp_path):
    with pytest.raises(TinyshieldError, match="model.safetensors: weights file not found"):
        read_safetensors(tmp_path / "model.safetensors")


def test_corrupt_weights_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(good))
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(TinyshieldError, match=r"model\.safetensors: not a readable safetensors file"):
        read_safetensors(bad)


def test_config_that_does_not_match_weights(tmp_path):
    small = BertClassifier(BertConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32))
    d = save_model(small, tmp_path / "m", {"kind": "bert-classifier",
                                           "model": {**small.config.to_dict(), "hidden_size": 32}})
    with pytest.raises(TinyshieldError) as e:
        load_dir(d)
    msg = str(e.value)
    assert "model.safetensors" in msg and "has shape" in msg and "\n" not in msg


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    m = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                             num_hidden_layers=1))
    state = dict(m.state_dict())
    state.pop("encoder.layer.0.output.dense.bias")
    state["encoder.layer.7.foo"] = torch.zeros(1)
    with pytest.raises(TinyshieldError, match=r"missing 1 tensor\(s\), e\.g\. encoder\.layer\.0\.output\.dense\.bias; "
                                              r"unexpected 1 tensor\(s\), e\.g\. encoder\.layer\.7\.foo"):
        load_into(m, state, "x.safetensors")


def test_saved_model_round_trips(tmp_path):
    m = BertClassifier(BertConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32))
    d = save_model(m, tmp_path / "m", {"kind": "bert-classifier", "model": m.config.to_dict(), "num_labels": 2})
    back = load_dir(d)
    ids = torch.randint(1, 50, (2, 7))
    assert torch.equal(back.model(ids), m.eval()(ids))

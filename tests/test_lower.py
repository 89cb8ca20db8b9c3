"""PTQ lowering of captured models: int8 graphs of the ViT and BERT track their float models; bad calibration
input is refused."""
import numpy as np
import pytest
import torch

from base.errors import TinyshieldError
from edge.models.bert import BertClassifier, BertConfig
from edge.models.vit import ViT, ViTConfig
from mcu.execute import reference, run
from mcu.schedules import layerwise
from base.data import image_batch
from mcu.from_aten import lower_module
from mcu.lower import OP_KINDS

TINY_BERT = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=32)


def random_ids(n, L, seed=0, vocab=100):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, L))
    for r in ids:
        r[rng.integers(3, L):] = 0
    return ids.astype(np.int32)


def dequant(g, name, q):
    t = g.tensors[name].q
    return (q.astype(np.float64) - t.zero_point) * t.scale[0]


def test_bert_classifier_int8_tracks_float():
    torch.manual_seed(0)
    m = BertClassifier(TINY_BERT).eval()
    ids = random_ids(64, 16)
    g = lower_module(m, ids)
    assert {op.kind for op in g.ops} <= set(OP_KINDS)
    with torch.no_grad():
        t = torch.from_numpy(ids[:6]).long()
        f = m(t, (t != 0).long()).numpy()
    q = np.stack([reference(g, {"input": ids[i]})["output"][0] for i in range(6)])
    err = np.abs(dequant(g, "output", q) - f).max()
    assert err < 0.05 * max(1.0, np.abs(f).max())


def test_bert_encoder_hidden_states_and_padding_invariance():
    torch.manual_seed(1)
    m = BertClassifier(TINY_BERT).eval().bert
    ids = random_ids(32, 16, seed=1)
    g = lower_module(m, ids)
    x = ids[0].copy()
    n = int((x != 0).sum())
    h = reference(g, {"input": x})["output"]
    with torch.no_grad():
        hf = m(torch.from_numpy(x[None]).long(), torch.from_numpy(x[None] != 0).long())[0].numpy()
    assert np.abs(dequant(g, "output", h)[:n] - hf[:n]).max() < 0.25
    # padded keys are masked out: changing nothing but what sits after the padding cannot change real rows
    y = x.copy()
    y[n:] = 0
    assert np.array_equal(reference(g, {"input": y})["output"][:n], h[:n])


def test_vit_int8_agrees_with_float_on_random_digits():
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    m = ViT(cfg).eval()
    rng = np.random.default_rng(0)
    imgs = (rng.random((40, 28, 28)) ** 4 * 255).astype(np.uint8)
    g = lower_module(m, image_batch(imgs[:32]))
    with torch.no_grad():
        f = m(torch.from_numpy(imgs[32:]).float().div(255).unsqueeze(1)).numpy()
    s = layerwise(g)
    q = np.stack([run(s, {"input": (im.astype(np.int16) - 128).astype(np.int8)})["output"][0] for im in imgs[32:]])
    assert np.abs(dequant(g, "output", q) - f).max() < 0.05 * max(1.0, np.abs(f).max())


def test_bad_calibration_input_is_refused():
    m = BertClassifier(TINY_BERT).eval()
    with pytest.raises(TinyshieldError, match="at least one"):
        lower_module(m, np.zeros((0, 8), dtype=np.int32))
    with pytest.raises(TinyshieldError, match="longer than this model's 32 positions"):
        lower_module(m, random_ids(4, 64))
    with pytest.raises(TinyshieldError, match="images must be uint8"):
        image_batch(np.zeros((4, 28, 28), dtype=np.float32))


def test_clr_embedding_lowers_to_the_int8_table():
    from edge.compress.clr import QuantCLR, factorize, layout_from_clusters
    from mcu.hostlib import HostKernels

    torch.manual_seed(2)
    m = BertClassifier(TINY_BERT).eval()
    table = m.bert.embeddings.word_embeddings.weight.detach()
    rng = np.random.default_rng(2)
    cluster_of = rng.integers(0, 3, size=TINY_BERT.vocab_size)
    lay = layout_from_clusters(cluster_of, ranks=(4, 6, 32), dense=(False, False, True), dim=32)
    quant = QuantCLR.from_float(factorize(table, lay))
    m.bert.embeddings.word_embeddings = quant.to_float()
    ids = random_ids(32, 16, seed=3)
    g = lower_module(m, ids, clr={"bert.embeddings.word_embeddings": quant})
    assert [op.kind for op in g.ops][:2] == ["pad_mask", "embedding_clr"]
    s = layerwise(g)
    hk = HostKernels("dsp")
    words = g.tensors["embeddings.word_embeddings.out"]
    want = quant.table().numpy()
    for x in ids[:4]:
        a = run(s, {"input": x})
        assert np.array_equal(a["output"], run(s, {"input": x}, kernels=hk)["output"])
    # the lookup itself reproduces QuantCLR's dequantised rows to within one output step
    from mcu.kernels import embedding_clr_s8
    c = {n: g.tensors[f"embeddings.word_embeddings.{n}"].data for n in ("slot", "clusters", "u", "v", "u_mult", "v_mult")}
    y = np.zeros(16 * 32, np.int8)
    x = ids[0]
    embedding_clr_s8(x, c["slot"], c["clusters"], c["u"], c["v"], c["u_mult"], c["v_mult"], y, 16, 32, 100,
                     len(c["clusters"]) // 9)
    got = y.reshape(16, 32) * words.q.scale[0]
    assert np.abs(got - want[x]).max() <= 1.01 * words.q.scale[0]


def test_calibration_accepts_a_tokenizer_batch():
    from edge.models.minilm import load_tokenizer, tokenize

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    m = BertClassifier(cfg).eval()
    batch = tokenize(load_tokenizer(), ["a fine film", "dull and far too long", "yes"], pad_to=16)
    g = lower_module(m, batch.input_ids)
    x = batch.input_ids[1].numpy().astype(np.int32)
    with torch.no_grad():
        f = m(batch.input_ids[1:2], batch.attention_mask[1:2]).numpy()
    assert np.abs(dequant(g, "output", reference(g, {"input": x})["output"]) - f).max() < 0.1

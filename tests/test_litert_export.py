"""fp32 export of the edge models (MiniLM, BERT-tiny classifier, ViT) to .tflite, checked against torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from base.errors import TinyshieldError
from edge.litert import Interpreter, MicroInterpreter, validate
from edge.litert.export import export_model
from edge.litert.validate import op_names
from edge.models.bert import BertClassifier, BertConfig, mean_pool
from edge.models.vit import ViT, ViTConfig


def _ids(B, L, vocab, seed=0, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    if pad_from is not None:
        ids[-1, pad_from:] = 0
    return ids


def test_minilm_sentence_embeddings_match_torch():
    from edge.models.minilm import load_minilm, load_tokenizer, tokenize
    torch.set_num_threads(1)
    model, tok = load_minilm(), load_tokenizer()
    L = 24
    texts = ["a gripping , funny and heartfelt film .", "dull , overlong and utterly forgettable ."]
    batch = tokenize(tok, texts, pad_to=L)
    assert (batch.attention_mask == 0).any()  # padding is exercised
    with torch.no_grad():
        ref = nn.functional.normalize(mean_pool(model(batch.input_ids, batch.attention_mask), batch.attention_mask),
                                      dim=-1).numpy()
    exported = export_model(model, seq_len=L, batch=2)
    names = op_names(validate(exported))
    assert {"GATHER", "FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX", "RSQRT", "SQUARED_DIFFERENCE",
            "MEAN", "GELU", "L2_NORMALIZATION"} <= set(names)
    y = Interpreter(exported, threads=2).run(batch.input_ids.numpy())
    assert y.shape == (2, 384)
    assert np.abs(y - ref).max() <= 1e-4


def test_bert_tiny_classifier_matches_torch_with_padding():
    torch.manual_seed(0)
    model = BertClassifier(BertConfig()).eval()    # BERT-tiny shape: 2 x 128, 2 heads, FFN 512
    L = 20
    ids = _ids(2, L, 30522, pad_from=11)
    with torch.no_grad():
        ref = model(ids, (ids > 0).long()).numpy()
    y = Interpreter(export_model(model, seq_len=L, batch=2)).run(ids.numpy())
    assert np.abs(y - ref).max() <= 1e-4


def test_bert_hidden_head_and_sigmoid_gelu_run_in_tflite_micro():
    """GELU as x * sigmoid(1.702 x) leaves only ops TFLite Micro has; fp32 encoder runs there too."""
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16)
    bert = BertClassifier(cfg).eval().bert
    exported = export_model(bert, seq_len=16, head="hidden", gelu="sigmoid")
    assert "GELU" not in op_names(validate(exported)) and "LOGISTIC" in op_names(validate(exported))
    for layer in bert.encoder.layer:
        layer.intermediate.act = lambda x: x * torch.sigmoid(1.702 * x)
    ids = _ids(1, 16, 300, pad_from=12)
    with torch.no_grad():
        ref = bert(ids, (ids > 0).long()).numpy()
    x = ids.numpy().astype(np.int32)
    np.testing.assert_allclose(Interpreter(exported).run(x), ref, atol=1e-4)
    run = MicroInterpreter(exported).run_full(x)
    np.testing.assert_allclose(run.outputs[0], ref, atol=1e-4)
    assert run.arena_bytes > 16 * 32 * 4


@pytest.mark.parametrize("stem", ["conv", "patch"])
def test_vit_matches_torch(stem):
    torch.manual_seed(0)
    model = ViT(ViTConfig(stem=stem)).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        ref = model(x).numpy()
    exported = export_model(model, batch=3)
    if stem == "conv":
        assert op_names(validate(exported))[:5] == ["RESHAPE", "PAD", "CONV_2D", "PAD", "CONV_2D"]
    y = Interpreter(exported).run(x.numpy())
    assert np.abs(y - ref).max() <= 1e-4


def test_sequential_export_and_unsupported_modules_are_named():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Dropout(0.1), nn.Linear(16, 4), nn.Tanh())
    seq.eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = seq(x).numpy()
    np.testing.assert_allclose(Interpreter(export_model(seq, input_shape=(2, 5, 8))).run(x.numpy()), ref, atol=1e-5)

    with pytest.raises(TinyshieldError, match=r"cannot export 1: LSTM is not supported"):
        export_model(nn.Sequential(nn.Linear(8, 8), nn.LSTM(8, 8)), input_shape=(1, 8))
    clf = BertClassifier(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=8))
    # a Conv1d that runs (over the 8 tokens as channels, padded to 32 outputs): 1-d convolutions have no lowering
    clf.bert.encoder.layer[0].intermediate.dense = nn.Conv1d(8, 8, 1, padding=8)
    with pytest.raises(TinyshieldError, match=r"bert\.encoder\.layer\.0\.intermediate\.dense: Conv1d"):
        export_model(clf, seq_len=8)
    with pytest.raises(TinyshieldError, match="Conv3d"):
        export_model(nn.Conv3d(1, 1, 1))
    with pytest.raises(TinyshieldError, match="fixed sequence length"):
        export_model(BertClassifier(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32)))
    with pytest.raises(TinyshieldError, match="exceeds the model's 8 positions"):
        export_model(clf.bert, seq_len=9)
    with pytest.raises(TinyshieldError, match="unknown GELU form"):
        export_model(seq, input_shape=(1, 8), gelu="erf")


class _TextEncoder(nn.Module):
    """Stock torch modules only: a pre-LN nn.TransformerEncoderLayer (GELU) over token ids with a [PAD]
    key mask, learned positions and a read-out of the first token."""

    def __init__(self, vocab=60, d=32, L=12, labels=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, L, d) * 0.1)
        self.enc = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True, norm_first=True,
                                              activation="gelu")
        self.head = nn.Linear(d, labels)

    def forward(self, ids):
        h = self.enc(self.emb(ids) + self.pos, src_key_padding_mask=ids == 0)
        return self.head(h[:, 0])


def test_stock_transformer_encoder_layer_and_its_pt2_match_torch(tmp_path, capsys):
    from edge.capture import capture
    from edge.litert.export import export_captured
    from tools.cli import main
    torch.manual_seed(0)
    model = _TextEncoder().eval()
    ids = _ids(2, 12, 60, pad_from=7)
    with torch.no_grad():
        ref = model(ids).numpy()
    y = Interpreter(export_captured(capture(model, (ids,), batch_one=False))).run(ids.numpy())
    np.testing.assert_allclose(y, ref, atol=1e-4)

    pt2, out = tmp_path / "enc.pt2", tmp_path / "enc.tflite"
    torch.export.save(torch.export.export(model, (ids,)), pt2)
    assert main(["export", str(pt2), "--format", "tflite", "-o", str(out)]) == 0
    assert "fp32" in capsys.readouterr().out
    np.testing.assert_allclose(Interpreter(out.read_bytes()).run(ids.numpy()), ref, atol=1e-4)

    # int8 from the same file, calibrated on a .npy of batch-first inputs
    calib, out8 = tmp_path / "calib.npy", tmp_path / "enc8.tflite"
    np.save(calib, np.concatenate([_ids(2, 12, 60, seed=s, pad_from=5 + s).numpy() for s in range(4)]))
    assert main(["export", str(pt2), "--int8", "--calib", str(calib), "-o", str(out8)]) == 0
    y8 = Interpreter(out8.read_bytes()).run(ids.numpy())
    assert np.linalg.norm(y8 - ref) < 0.2 * np.linalg.norm(ref)


class _Cumsum(nn.Module):
    def forward(self, x):
        return x.cumsum(1)          # no .tflite lowering


def test_unsupported_op_names_op_module_and_source_line():
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), _Cumsum()))
    with pytest.raises(TinyshieldError, match=r"cannot export 1\.1: _Cumsum is not supported .*aten\.cumsum.*"
                                              r"test_litert_export\.py:\d+ \(return x\.cumsum\(1\)"):
        export_model(net, input_shape=(1, 3, 4))

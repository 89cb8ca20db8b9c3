"""`tinyshield export` and `tinyshield run --backend torch|litert|tflm` on small saved models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edge.litert import validate
from edge.litert.artefacts import read_meta
from edge.models.bert import BertClassifier, BertConfig
from edge.models.io import save_model
from edge.models.vit import ViT, ViTConfig
from tools.cli import main

TEXT_CFG = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64)


@pytest.fixture
def text_model(tmp_path):
    torch.manual_seed(0)
    m = BertClassifier(BertConfig(**TEXT_CFG))
    return save_model(m, tmp_path / "clf", {"kind": "bert-classifier", "model": TEXT_CFG, "num_labels": 2,
                                            "labels": ["negative", "positive"]})


@pytest.fixture
def image_model(tmp_path):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return save_model(ViT(ViTConfig(**cfg)), tmp_path / "vit", {"kind": "vit", "model": cfg})


@pytest.mark.slow
def test_export_fp32_and_int8_and_run_them(text_model, tmp_path, build_tmp, capsys):
    out = tmp_path / "clf.tflite"
    assert main(["export", str(text_model), "--seq-len", "16", "-o", str(out)]) == 0
    meta = read_meta(validate(out.read_bytes()))
    assert meta["kind"] == "bert-classifier" and meta["seq_len"] == 16 and meta["int8"] is None
    assert "fp32" in capsys.readouterr().out

    out8 = tmp_path / "clf8.tflite"
    assert main(["export", str(text_model), "--seq-len", "16", "--int8", "--calib", "random",
                 "-o", str(out8)]) == 0
    assert read_meta(validate(out8.read_bytes()))["int8"] == "hybrid"
    assert len(out8.read_bytes()) < len(out.read_bytes()) / 2
    capsys.readouterr()

    for f in (out, out8):
        assert main(["run", str(f), "a fine film", "a dreadful film", "--backend", "litert", "--threads", "1"]) == 0
        text = capsys.readouterr().out
        assert text.count("class ") == 2 and ("negative" in text or "positive" in text)


@pytest.mark.slow
def test_run_backends_agree_on_a_model_dir(text_model, build_tmp, capsys):
    preds = {}
    for backend in ("torch", "litert", "tflm"):
        assert main(["run", str(text_model), "what a film", "--backend", backend, "--seq-len", "16"]) == 0
        out = capsys.readouterr().out
        line = [l for l in out.splitlines() if "class" in l][0]
        preds[backend] = line.split("class ")[1].split()[0]
        if backend == "tflm":
            assert "TFLite Micro arena:" in out and "sigmoid" in out
    assert preds["torch"] == preds["litert"]
    # the cache: a second run reuses the exported file
    assert len(list((build_tmp / "tflite").iterdir())) == 2   # litert fp32 (exact GELU) + tflm (sigmoid GELU)


def test_run_image_model_from_npy(image_model, tmp_path, build_tmp, capsys):
    img = tmp_path / "digit.npy"
    np.save(img, (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8))
    for backend in ("torch", "litert"):
        assert main(["run", str(image_model), str(img), "--backend", backend]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "class" in l]
    assert len(lines) == 2 and lines[0].split("class")[1].split()[0] == lines[1].split("class")[1].split()[0]


def test_cli_errors_are_clear(text_model, image_model, tmp_path, build_tmp, capsys):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"TFL3 not really")
    cases = [
        (["run", str(bad), "hello", "--backend", "litert"], "not a valid .tflite model"),
        (["run", str(tmp_path / "missing.tflite"), "hello", "--backend", "tflm"], "not found"),
        (["run", str(text_model), "hi", "--backend", "torch", "--int8"], "torch backend runs fp32 only"),
        (["run", str(image_model), "nothing.png", "--backend", "litert"], "neither mnist:INDEX nor an image"),
        (["export", str(text_model), "--calib", "sst2"], "only apply with --int8"),
        (["export", str(image_model), "--int8", "--calib", "sst2"], "does not fit a vit model"),
        (["export", str(text_model), "--seq-len", "0"], "--seq-len must be >= 1"),
        (["export", "no-such-model"], "unknown model"),
        (["export", str(text_model), "--seq-len", "100"], "exceeds the model's 64 positions"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err, argv


def test_export_and_run_a_pt2(tmp_path, build_tmp, capsys):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(1, 6)
    pt2, out, inp = tmp_path / "seq.pt2", tmp_path / "seq.tflite", tmp_path / "x.npy"
    torch.export.save(torch.export.export(m, (x,)), pt2)
    np.save(inp, x[0].numpy())
    assert main(["export", str(pt2), "--format", "tflite", "-o", str(out)]) == 0
    assert read_meta(validate(out.read_bytes()))["kind"] == "pt2"
    assert main(["run", str(out), str(inp), "--backend", "litert"]) == 0
    first = m(x).detach().numpy().reshape(-1)[:3]
    assert np.array2string(first, precision=4) in capsys.readouterr().out
    assert main(["export", str(pt2), "--seq-len", "4"]) == 2
    assert "keeps the shapes of its example input" in capsys.readouterr().err

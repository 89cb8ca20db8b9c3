"""Expert store: round trip, int8, checksums, missing files, reads that go past the page cache."""
import json

import pytest
import torch

from base.errors import TinyshieldError
from edge.moe.model import MoEConfig, MoEModel
from edge.moe.store import ExpertStore, write_store

CFG = MoEConfig(dim=32, layers=2, heads=2, experts=4, ffn=48, context=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoEModel(CFG).eval()


def test_round_trip_float32(model, tmp_path):
    store = write_store(model, tmp_path)
    for l in range(CFG.layers):
        for e in range(CFG.experts):
            x = store.read((l, e))
            assert torch.equal(x.w1, model.blocks[l].moe.w1[e]) and torch.equal(x.w2, model.blocks[l].moe.w2[e])
    assert store.reads == CFG.layers * CFG.experts
    assert store.bytes_read == sum(v["file_bytes"] for v in store.manifest["experts"].values())
    assert store.expert_bytes == 2 * CFG.dim * CFG.ffn * 4
    # experts dominate the files, and the dense part holds no expert weights
    assert not any(k.endswith((".w1", ".w2")) and ".moe." in k for k in store.dense_state())


def test_int8_store_is_close_and_four_times_smaller(model, tmp_path):
    store = write_store(model, tmp_path, int8=True)
    x = store.read((1, 2))
    w1, _ = x.weights()
    ref = model.blocks[1].moe.w1[2]
    assert x.w1.dtype == torch.int8
    assert (w1 - ref).abs().max() <= ref.abs().amax(0).max() / 127 * 0.5 + 1e-6
    assert store.expert_bytes < 2 * CFG.dim * CFG.ffn + 4 * (CFG.ffn + CFG.dim) + 1


def test_corrupt_expert_is_named_by_checksum(model, tmp_path):
    store = write_store(model, tmp_path)
    f = tmp_path / "experts" / "L1E3.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-5] ^= 0xFF  # flip bits inside the weights: still parses, only the checksum can tell
    f.write_bytes(bytes(blob))
    store.read((1, 2))  # others still fine
    with pytest.raises(TinyshieldError, match=r"expert L1E3: checksum mismatch in .*L1E3\.safetensors"):
        store.read((1, 3))


def test_missing_expert_file_and_unknown_expert(model, tmp_path):
    store = write_store(model, tmp_path)
    (tmp_path / "experts" / "L0E1.safetensors").unlink()
    with pytest.raises(TinyshieldError, match=r"expert L0E1: file .*L0E1\.safetensors is missing"):
        store.read((0, 1))
    with pytest.raises(TinyshieldError, match=r"expert \(5, 0\) is not in the store"):
        store.read((5, 0))


def test_missing_or_bad_manifest(tmp_path):
    with pytest.raises(TinyshieldError, match="manifest.json missing"):
        ExpertStore(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(TinyshieldError, match="invalid JSON"):
        ExpertStore(tmp_path)


def test_reads_drop_the_page_cache(model, tmp_path, monkeypatch):
    """Every read ends with posix_fadvise(DONTNEED) on the whole file, so repeated reads hit storage."""
    import os

    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: (calls.append((off, n, adv)), real(fd, off, n, adv)))
    store = write_store(model, tmp_path)
    store.read((0, 0))
    store.read((0, 0))
    assert calls == [(0, 0, os.POSIX_FADV_DONTNEED)] * 2
    assert json.loads((tmp_path / "manifest.json").read_text())["experts"]["0/0"]["sha256"]

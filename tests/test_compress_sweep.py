"""A compression sweep on Ray Tune: real SST-2 statistics, a real local Ray, real trials.

Small on purpose (a 1-layer BERT with the real 30,522-token vocabulary, 4 trials, 64 dev
sentences): the machines have two cores shared with other work."""
from __future__ import annotations

import json

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed: the sweep tests need the optional 'fleet' extra "
                                        "(pip install -e '.[fleet]'; `make test` installs it)")

from base.cluster import init_ray  # noqa: E402
from base.errors import TinyshieldError  # noqa: E402
from edge.compress.sweep import compress_sweep  # noqa: E402
from edge.models.bert import BertClassifier, BertConfig  # noqa: E402

pytestmark = pytest.mark.slow
KB = 1 << 10


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=1)              # one trial at a time: the host is shared
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    return BertClassifier(cfg, 2).eval()


def test_compress_sweep_finishes_writes_its_table_and_caches_its_trials(shared_data, local_ray, classifier,
                                                                        tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSHIELD_BUILD", str(tmp_path / "build"))
    budgets = [256 * KB, 384 * KB]
    kw = dict(layouts=("bands1", "bands8"), dev_limit=64, train_limit=200)
    res = compress_sweep(classifier, "bert-small", budgets, "bytes", tmp_path / "sweep", **kw)

    assert len(res.trials) == 4 and not any(t.cached for t in res.trials)
    assert {(t.budget, t.layout) for t in res.trials} == {(b, lay) for b in budgets for lay in kw["layouts"]}
    for t in res.trials:
        assert t.flash_bytes <= t.budget and t.metric == "sensitivity"
        assert t.candidate == t.layout and t.clusters == (1 if t.layout == "bands1" else 8)
        assert 0 <= t.fidelity <= 1 and 0 <= t.accuracy <= 1 and 0 < t.rel_error < 1
    # the front: every trial is matched by a front point at most as large and at least as faithful
    assert res.pareto and all(t in res.trials for t in res.pareto)
    assert all(any(f.flash_bytes <= t.flash_bytes and f.fidelity >= t.fidelity for f in res.pareto)
               for t in res.trials)
    assert [f.fidelity for f in res.pareto] == sorted(f.fidelity for f in res.pareto)

    table = (tmp_path / "sweep" / "table.md").read_text()
    assert table.count("\n| bands") == len(res.trials) and " *" in table
    saved = json.loads((tmp_path / "sweep" / "trials.json").read_text())
    assert len(saved["trials"]) == 4 and saved["pareto"] == [t.label for t in res.pareto]
    assert (tmp_path / "sweep" / "pareto.png").stat().st_size > 10_000

    # run again: every trial comes from the cache under the build dir, with the same results
    again = compress_sweep(classifier, "bert-small", budgets, "bytes", tmp_path / "sweep2", **kw)
    assert all(t.cached for t in again.trials)
    strip = lambda t: {k: v for k, v in vars(t).items() if k not in ("seconds", "cached")}  # noqa: E731
    assert [strip(t) for t in again.trials] == [strip(t) for t in res.trials]


def test_compress_sweep_refuses_bad_settings_before_it_starts(shared_data, local_ray, classifier, tmp_path):
    with pytest.raises(TinyshieldError, match="cluster layout 'kmeans4'"):
        compress_sweep(classifier, "bert-small", [256 * KB], "bytes", tmp_path / "s", layouts=("kmeans4",))
    with pytest.raises(TinyshieldError, match="smallest feasible budget"):
        compress_sweep(classifier, "bert-small", [64 * KB], "bytes", tmp_path / "s")
    assert not (tmp_path / "s").exists()

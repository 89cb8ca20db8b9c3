"""The prefetch thread: reads land in the cache, shutdown is clean, and many threads race nothing."""
import random
import threading
import time

import pytest
import torch

from base.errors import TinyshieldError
from edge.moe.cache import ExpertCache
from edge.moe.model import MoEConfig, MoEModel
from edge.moe.policies import LFU, LayerLRU
from edge.moe.prefetch import Prefetcher
from edge.moe.store import write_store

CFG = MoEConfig(dim=16, layers=3, heads=2, experts=6, ffn=32, context=16)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.manual_seed(0)
    return write_store(MoEModel(CFG), tmp_path_factory.mktemp("store"))


def test_prefetched_expert_lands_in_cache(store):
    cache = ExpertCache(store.expert_bytes * 4, LFU())
    go = threading.Event()
    with Prefetcher(lambda k: (go.wait(5), store.read(k))[1], cache, lambda x: x.nbytes) as pf:
        assert pf.request((1, 2))
        assert not pf.request((1, 2))  # in flight: no second read
        fut = pf.pending((1, 2))
        go.set()
        assert fut.result(timeout=10).w1.shape == (CFG.dim, CFG.ffn)
        deadline = time.time() + 10
        while (1, 2) not in cache and time.time() < deadline:
            time.sleep(0.01)
        assert (1, 2) in cache
        assert not pf.request((1, 2))  # already cached: no second read
    assert not pf.thread.is_alive() and not pf.request((0, 0))


def test_read_errors_reach_the_waiting_decoder(store, tmp_path):
    from edge.moe.model import MoEModel as M
    broken = write_store(M(CFG), tmp_path)
    (tmp_path / "experts" / "L2E5.safetensors").write_bytes(b"garbage")
    cache = ExpertCache(10**6, LFU())
    go = threading.Event()
    with Prefetcher(lambda k: (go.wait(5), broken.read(k))[1], cache, lambda x: x.nbytes) as pf:
        pf.request((2, 5))
        fut = pf.pending((2, 5))
        go.set()
        with pytest.raises(TinyshieldError, match="L2E5: checksum mismatch"):
            fut.result(timeout=10)
    assert (2, 5) not in cache


def test_close_with_queued_work_cancels_and_joins(store):
    cache = ExpertCache(store.expert_bytes * 2, LayerLRU([1, 1, 1]))
    slow = threading.Event()

    def read(key):
        slow.wait(5)
        return store.read(key)

    pf = Prefetcher(read, cache, lambda x: x.nbytes)
    keys = [(l, e) for l in range(3) for e in range(6)]
    futs = [pf.pending(k) for k in keys if pf.request(k)]
    slow.set()
    pf.close()
    assert not pf.thread.is_alive()
    assert all(f.done() for f in futs)  # finished or cancelled, none left hanging
    assert cache.used <= cache.budget
    pf.close()  # idempotent


def test_stress_many_threads(store):
    """16 threads hammer one cache and one prefetcher with requests, demand accesses and inserts."""
    budget = store.expert_bytes * 5 + store.expert_bytes // 2
    cache = ExpertCache(budget, LayerLRU([2, 2, 1]))
    over = []
    orig_put = cache.put

    def checked_put(key, value, nbytes):
        ok = orig_put(key, value, nbytes)
        with cache.lock:
            if cache.used > budget or cache.used != sum(cache.sizes.values()):
                over.append(cache.used)
        return ok

    cache.put = checked_put
    pf = Prefetcher(store.read, cache, lambda x: x.nbytes)
    errors = []
    keys = [(l, e) for l in range(CFG.layers) for e in range(CFG.experts)]

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(400):
                k = rng.choice(keys)
                op = rng.random()
                if op < 0.4:
                    pf.request(k)
                elif op < 0.8:
                    fut = pf.pending(k)
                    v = fut.result(timeout=30) if fut is not None else cache.access(k)
                    if v is None:
                        v = store.read(k)
                        cache.put(k, v, v.nbytes)
                    assert torch.equal(v.w1, store.read(k).w1) if rng.random() < 0.05 else True
                else:
                    v = cache.access(k)
                    assert v is None or v.w1.shape == (CFG.dim, CFG.ffn)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    pf.close()
    assert not errors, errors[0]
    assert not over
    assert not pf.thread.is_alive() and not any(t.is_alive() for t in threads)
    assert cache.stats.peak_bytes <= budget and not pf.inflight

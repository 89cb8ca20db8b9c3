"""Storage profiles: the store really reads the files, then each read lasts latency + bytes / bandwidth."""
import statistics
import threading
import time

import pytest
import torch

from base.errors import TinyshieldError
from edge.moe.model import MoEConfig, MoEModel
from edge.moe.storage import PROFILES, Device, StorageProfile, profile
from edge.moe.store import ExpertStore, write_store

CFG = MoEConfig(dim=64, layers=2, heads=2, experts=4, ffn=128, context=32)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("store")
    write_store(MoEModel(CFG).eval(), d)
    return d


def test_profiles_are_sourced_and_ordered():
    real = {k: v for k, v in PROFILES.items() if v is not None}
    assert set(real) == {"ufs", "emmc", "sd", "qspi"} and PROFILES["host"] is None
    for p in real.values():
        assert p.latency_s > 0 and p.bandwidth > 0 and len(p.source) > 60  # a datasheet named, not a bare number
    # a 400 kB expert: phone UFS is fastest, then eMMC, SD, and the MCU's QSPI flash slowest
    cost = {k: p.cost(400_000) for k, p in real.items()}
    assert cost["ufs"] < cost["emmc"] < cost["sd"] < cost["qspi"]
    with pytest.raises(TinyshieldError, match="unknown storage profile 'floppy'.*emmc"):
        profile("floppy")


@pytest.mark.parametrize("name", ["emmc", "sd", "qspi"])
def test_throttled_reads_take_the_profile_time(store_dir, name):
    """Per read: never faster than the profile, and the median within 25% + 1.5 ms of it (scheduler slack
    on a busy machine is the tolerance). The files are really read: bytes and checksums are counted."""
    store = ExpertStore(store_dir, storage=name)
    cost = store.device.profile.cost(store.entry((0, 0))["file_bytes"])
    took = []
    for k in store.keys():
        t0 = time.perf_counter()
        store.device.read(lambda: store._read_file(store.root / store.entry(k)["file"]), store.entry(k)["file_bytes"])
        took.append(time.perf_counter() - t0)
    assert min(took) >= cost * 0.999
    assert statistics.median(took) <= cost * 1.25 + 1.5e-3
    store.read((1, 1))
    assert store.reads == 1 and store.bytes_read == store.entry((1, 1))["file_bytes"]
    assert store.device.modelled_seconds == pytest.approx(cost * (len(took) + 1))


def test_device_serves_one_command_at_a_time():
    """Two overlapping reads on one device queue: the second ends ~two costs after both started."""
    dev = Device(StorageProfile("test", 20e-3, 1e9, "test"))
    ends = []
    t0 = time.perf_counter()
    th = [threading.Thread(target=lambda: ends.append(dev.read(lambda: time.perf_counter(), 0) and
                                                      time.perf_counter() - t0)) for _ in range(2)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert sorted(ends)[0] >= 0.0199 and sorted(ends)[1] >= 0.0399
    assert sorted(ends)[1] < 0.0399 + 0.03


def test_host_store_is_not_throttled(store_dir):
    store = ExpertStore(store_dir)
    assert store.device is None and store.storage == "host"

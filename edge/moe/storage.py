"""Storage that behaves like the device a user has: phone UFS, eMMC, an SD card, a microcontroller's QSPI flash.

The expert store really reads its files (page cache dropped after every read); a `Device` then makes
the read last as long as it would on the profile's hardware: one command costs
`latency + bytes / bandwidth`. The device serves one command at a time (eMMC, SD and SPI flash have a
single command queue; for UFS it is the conservative choice), so a prefetch read and a demand read
that overlap queue behind each other instead of both finishing early. If the real read is slower
than the profile, the real time stands: the profile is a floor, never a speed-up.

Figures (read side only; decoding never writes). Bandwidth is the sequential read rate of the part
and latency the cost of one random read command at queue depth 1. Where a datasheet gives random
performance as IOPS at 4 KiB, latency = 1 / IOPS; where it gives IOPS only at a deep queue (UFS),
that is not a latency, and the figure used is the QD1 value stated next to it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from base.errors import TinyshieldError


@dataclass(frozen=True)
class StorageProfile:
    name: str
    latency_s: float     # one read command, queue depth 1
    bandwidth: float     # sequential read, bytes per second
    source: str          # where the two numbers come from

    def cost(self, nbytes: int) -> float:
        """Seconds one read of `nbytes` takes on this device."""
        return self.latency_s + nbytes / self.bandwidth

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, StorageProfile | None] = {
    # No throttling: whatever this machine's disk and file system give (NVMe/virtio here: 512 kB in ~0.4 ms).
    "host": None,
    "ufs": StorageProfile(
        "ufs", 100e-6, 2100e6,
        "phone UFS 3.1: Samsung 512 GB eUFS 3.1 announcement (Mar 2020): sequential read 2,100 MB/s, random "
        "read 100,000 IOPS at deep queues; JEDEC JESD220E (UFS 3.1) HS-G4 2 lanes = 2.9 GB/s raw. QD1 4 KiB "
        "random read is not in the datasheet; 100 us is the QD1 figure (~10k IOPS) phone storage benchmarks report"),
    "emmc": StorageProfile(
        "emmc", 250e-6, 250e6,
        "eMMC 5.1: JEDEC JESD84-B51 HS400 bus = 400 MB/s max; Samsung eMMC 5.1 product brief (KLMxGxJETD): "
        "sequential read up to 250 MB/s (64 GB part), random read ~4,000 IOPS at 4 KiB -> 250 us per command "
        "(eMMC without command queueing serves one command at a time)"),
    "sd": StorageProfile(
        "sd", 667e-6, 90e6,
        "microSD UHS-I, A1 class: SD Physical Layer Simplified Specification 6.00 - UHS-I SDR104 bus = 104 MB/s "
        "(~90 MB/s of data after protocol overhead, what U3/V30 cards read in practice); Application "
        "Performance Class 1: >= 1,500 random-read IOPS at 4 KiB -> 667 us per command"),
    "qspi": StorageProfile(
        "qspi", 2e-6, 66e6,
        "MCU external QSPI NOR: Winbond W25Q128JV datasheet rev. L: Fast Read Quad I/O at 133 MHz, "
        "'66 MB/S continuous data transfer rate'; a read command is ~20 clocks (instruction, 24-bit address "
        "and dummy cycles) = 0.15 us, rounded up to 2 us for the MCU's QSPI controller set-up"),
}


def profile(name: str | None) -> StorageProfile | None:
    """A profile by name (None or 'host' = no throttling)."""
    if name is None:
        return None
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise TinyshieldError(f"unknown storage profile {name!r}; choose one of {', '.join(PROFILES)}") from None


class Device:
    """A single-queue storage device: each read finishes no earlier than its modelled completion time.

    `read(fn, nbytes)` runs `fn` (the real read) and then sleeps until the command would be done on the
    profile's hardware. Commands are served in arrival order, one at a time."""

    def __init__(self, prof: StorageProfile):
        self.profile = prof
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self.modelled_seconds = 0.0  # sum of per-command costs (what the device spent)

    def read(self, fn, nbytes: int):
        t0 = time.perf_counter()
        cost = self.profile.cost(nbytes)
        with self._lock:
            start = max(t0, self._busy_until)
            done = start + cost
            self._busy_until = done
            self.modelled_seconds += cost
        out = fn()
        now = time.perf_counter()
        if now > done:  # the real read was slower than the profile: the device stays busy until it ended
            with self._lock:
                self._busy_until = max(self._busy_until, now)
        # Sleep in one go: the kernel's timer slack (~50-100 us) is below every profile's per-read cost
        # for an expert-sized read, and spinning would take a core from the decoder.
        left = done - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return out

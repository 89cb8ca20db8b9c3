"""Mixture-of-Experts inference under a RAM budget.

model.py      the byte-level MoE language model (training / all-in-RAM forward)
train.py      `tinyshield moe train`: training on the shared corpora, cached by config hash
store.py      experts on storage: one safetensors file each, sha256 manifest, page-cache-dropping reads
storage.py    device profiles (UFS, eMMC, SD, QSPI): reads that last as long as on the device
kernels.py    the quantised (int8 / packed int4) expert FFN in C (csrc/), called once per expert use
placement.py  every expert resident: int8, the least-used as int4, to fit the budget
policies.py   eviction policies (on-demand, per-layer LRU, LFU, Belady) and the DP slot allocation
cache.py      the byte-budgeted, thread-safe expert cache
prefetch.py   the background I/O thread
runtime.py    token-by-token decoding with experts from the cache; adaptive gating; prefetching
calibrate.py  AdapMoE's offline measurements: sensitivities, gating threshold, per-layer hit curves
adapmoe.py    assembling a runtime by policy name; budget parsing
routing.py    cache-aware routing: a bonus on resident experts' gate logits, within a margin
replay.py     offline replay of recorded traces (hit rates, Belady ceiling)
"""

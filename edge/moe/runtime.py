"""Token-by-token MoE decoding with experts served from a budgeted cache over the expert store.

Dense weights (embeddings, attention, routers, head) stay in RAM; experts come from `ExpertCache`,
missing ones are read from `ExpertStore` (the decoder waits: stall time). AdapMoE's two run-time
ideas live here: adaptive gating (`Gating`: drop the second expert when s_l * w2^2 < T) and
prefetching layer l+1's top expert, predicted by layer l+1's router on layer l's hidden state,
through a background I/O thread (`Prefetcher`). With gating off, the numbers computed are the
same whatever the policy: the cache changes where weights come from, never what they are.

Past AdapMoE, two knobs change what is computed, each bounded and calibrated for a perplexity cost:
cache-aware routing (`route_margin`: a close call goes to an expert already in RAM, see
`edge.moe.routing`) and cheap misses (`lowp`: a miss of a less important expert -- not the top
choice, gate weight below `lowp_max_weight` -- reads the int8 or int4 copy, HOBBIT-style; a later
important use of a low-precision copy reads the full expert and replaces it in the cache). With
`lowp_max_weight` >= 1 every expert is served from the copy: the cache then holds int8 experts only,
four times as many in the same bytes, multiplied in int8 (`Expert.ffn`), and the per-layer slots are
counted in the copy's bytes.

When the budget is just short of holding every int8 expert, policy "resident" keeps them all anyway,
the least-used ones as packed int4 (`edge.moe.placement`): RAM is filled once at load, decoding never
reads storage.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn import functional as F

from base.errors import TinyshieldError
from edge.moe.cache import ExpertCache
from edge.moe.model import MoEModel, route
from edge.moe.policies import LFU, Belady, Key, LayerLRU, LeastStale, NoCache, Policy, even_slots
from edge.moe.prefetch import Prefetcher
from edge.moe.routing import cache_aware_route
from edge.moe.store import Expert, ExpertStore

POLICIES = ("ram", "resident", "on-demand", "lru", "lfu", "least-stale", "adapmoe", "belady")


@dataclass
class Gating:
    """Sensitivity-based adaptive gating: per-layer s_l (estimated from data) and one threshold T."""
    sensitivity: list[float]
    threshold: float

    def keep_second(self, layer: int, w2: float) -> bool:
        return self.sensitivity[layer] * w2 * w2 >= self.threshold


@dataclass
class RunStats:
    tokens: int = 0
    accesses: int = 0          # demand accesses (experts the decoder needed)
    hits: int = 0              # resident and ready when needed
    late: int = 0              # in flight (prefetched) when needed: partial stall
    misses: int = 0            # read synchronously
    prefetch_issued: int = 0
    prefetch_used: int = 0     # prefetched experts that were needed before being evicted
    experts_activated: int = 0
    predictions: int = 0       # next-layer top-1 guesses made for prefetching
    predictions_right: int = 0
    bytes_read: int = 0
    stall_seconds: float = 0.0
    wall_seconds: float = 0.0
    nll_sum: float = 0.0
    nll_count: int = 0
    lowp_reads: int = 0        # misses served by a low-precision copy
    upgrades: int = 0          # a low-precision copy was cached but the full expert was needed (counted as a miss)
    reroutes: int = 0          # layer passes where cache-aware routing chose differently from plain top-k
    device_seconds: float = 0.0  # modelled storage time of the profile (sum over reads)
    load_seconds: float = 0.0  # filling RAM before decoding ("ram", "resident"): not part of wall_seconds
    load_bytes: int = 0        # bytes read for that
    trace: list = field(default_factory=list, repr=False)  # demand keys in order

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.accesses)

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetch_issued if self.prefetch_issued else float("nan")

    @property
    def prefetch_recall(self) -> float:
        """Of the accesses that were not already resident without prefetching, the share prefetch served."""
        need = self.prefetch_used + self.misses
        return self.prefetch_used / need if need and self.prefetch_issued else float("nan")

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll_sum / self.nll_count).exp()) if self.nll_count else float("nan")

    def summary(self) -> dict:
        t = max(1, self.tokens)
        d = {k: v for k, v in asdict(self).items() if k != "trace"}
        d.update(hit_rate=self.hit_rate,
                 prediction_accuracy=self.predictions_right / self.predictions if self.predictions else float("nan"), prefetch_precision=self.prefetch_precision,
                 prefetch_recall=self.prefetch_recall, perplexity=self.perplexity,
                 bytes_per_token=self.bytes_read / t, stall_ms_per_token=1e3 * self.stall_seconds / t,
                 tokens_per_s=self.tokens / self.wall_seconds if self.wall_seconds else float("nan"),
                 ms_per_token=1e3 * self.wall_seconds / t, experts_per_token=self.experts_activated / t)
        return d


def dense_model(store: ExpertStore) -> MoEModel:
    """The model without its experts (their parameters become empty): what RAM holds besides the cache."""
    model = MoEModel(store.cfg)
    state = store.dense_state()
    own = model.dense_state()
    missing = [k for k in own if k not in state]
    if missing:
        raise TinyshieldError(f"{store.root / 'dense.safetensors'}: missing {missing[0]} — rebuild the store")
    model.load_state_dict({**model.state_dict(), **state})
    for b in model.blocks:
        b.moe.w1 = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        b.moe.w2 = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    return model.eval()


def make_policy(name: str, store: ExpertStore, budget_bytes: int, slots: list[int] | None = None,
                trace: list[Key] | None = None, unit_bytes: int | None = None) -> Policy:
    """unit_bytes: RAM bytes of one cached expert, for the slot-counting policies (default: a full expert)."""
    cfg = store.cfg
    total = budget_bytes // (unit_bytes or store.expert_bytes)
    if name == "on-demand":
        return NoCache()
    if name == "lru":
        return LayerLRU(even_slots(cfg.layers, cfg.experts, total))
    if name == "lfu":
        return LFU()
    if name == "least-stale":
        return LeastStale(cfg.layers)
    if name == "adapmoe":
        return LayerLRU(slots if slots is not None else even_slots(cfg.layers, cfg.experts, total))
    if name == "belady":
        if trace is None:
            raise TinyshieldError("belady is offline-only: it needs the future accesses. Use `tinyshield moe trace` "
                                  "(replays a recorded trace) or `tinyshield moe bench`")
        return Belady(trace)
    raise TinyshieldError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")


class MoERuntime:
    def __init__(self, store: ExpertStore, policy: str = "lru", budget_bytes: int = 0, *,
                 gating: Gating | None = None, prefetch: bool = False, slots: list[int] | None = None,
                 trace: list[Key] | None = None, model: MoEModel | None = None, prefetch_at: str = "attn",
                 route_margin: float = 0.0, lowp: str | None = None, lowp_max_weight: float = 0.5,
                 prefetch_k: int = 1, placement=None):
        """prefetch_at: guess layer l+1's expert from layer l's hidden state after its attention ("attn",
        more time to hide the read) or after its FFN ("ffn", a closer guess, less time).
        route_margin: cache-aware routing's bonus on the gate logits of resident experts (0 = top-k).
        lowp: "int8" or "int4": on a miss of an expert with gate weight < lowp_max_weight, read that copy (the
        top expert's weight is >= 1/top_k, so thresholds up to that spare it; from 1 on, every expert is low-precision).
        prefetch_k: how many of layer l+1's predicted experts to prefetch (after cache-aware routing's bonus).
        placement: policy "resident": the copy of each expert held in RAM (`edge.moe.placement.place`), read
        once here; its bytes must fit `budget_bytes`."""
        if prefetch_at not in ("attn", "ffn"):
            raise TinyshieldError(f"prefetch_at is 'attn' or 'ffn', not {prefetch_at!r}")
        if route_margin < 0:
            raise TinyshieldError(f"route_margin must be >= 0 (a bonus for resident experts), got {route_margin}")
        if lowp is not None and lowp not in store.copies:
            raise TinyshieldError(f"low-precision copy {lowp!r} is not in the store {store.root} "
                                  f"(it has {store.copies or 'none'}); rebuild it with the copies")
        self.route_margin = route_margin
        self.lowp = lowp
        self.lowp_max_weight = lowp_max_weight
        self.lowp_only = lowp is not None and lowp_max_weight >= 1
        self.prefetch_k = prefetch_k
        self.full_precision = "int8" if store.int8 else "float32"
        self.prefetch_at = prefetch_at
        self.store = store
        self.cfg = store.cfg
        self.model = model or dense_model(store)
        self.gating = gating
        self.policy_name = policy
        self.stats = RunStats()
        self._prefetched: set[Key] = set()
        self._plock = threading.Lock()
        t0, read0 = time.perf_counter(), store.bytes_read
        if policy == "ram":
            self.resident = store.load_all()
            self.cache = None
        elif policy == "resident":
            if placement is None:
                raise TinyshieldError("policy 'resident' needs a placement (edge.moe.placement.place, or "
                                      "edge.moe.adapmoe.open_runtime which measures one)")
            self.resident = {k: store.read(k, placement.precisions[k]) for k in store.keys()}
            used = sum(v.nbytes for v in self.resident.values())
            if used > budget_bytes:
                raise TinyshieldError(f"the placement holds {used:,} B of experts, over the budget of "
                                      f"{budget_bytes:,} B: place it again for this budget")
            self.cache = None
        else:
            self.resident = None
            unit = store.expert_bytes_of(lowp) if self.lowp_only else None
            self.cache = ExpertCache(budget_bytes, make_policy(policy, store, budget_bytes, slots, trace, unit))
            self.cache.on_evict = self._forget_prefetch
        ahead = self.lowp if self.lowp_only else "full"  # prefetch what the decoder will accept
        self.prefetcher = (Prefetcher(lambda key: store.read(key, ahead), self.cache, lambda x: x.nbytes,
                                      self._forget_prefetch)
                           if prefetch and self.cache is not None else None)
        self.stats.load_seconds = time.perf_counter() - t0
        self.stats.load_bytes = store.bytes_read - read0
        self.placement = placement
        store.reset_counters()
        self.reset()

    # ---- experts -------------------------------------------------------------------------------
    def _forget_prefetch(self, key: Key) -> None:
        with self._plock:
            self._prefetched.discard(key)

    def _read(self, key: Key, precision: str = "full") -> Expert:
        t0 = time.perf_counter()
        try:
            return self.store.read(key, precision)
        finally:
            self.stats.stall_seconds += time.perf_counter() - t0

    def expert(self, key: Key, cheap: bool = False) -> Expert:
        """The demand path: cached, in flight (wait), or a synchronous read (stall).

        cheap: this expert matters little for the token; a low-precision copy will do (cached or read)."""
        s = self.stats
        s.accesses += 1
        s.trace.append(key)
        if self.resident is not None:
            s.hits += 1
            return self.resident[key]
        with self._plock:
            was_prefetched = key in self._prefetched
            self._prefetched.discard(key)
        fut = self.prefetcher.pending(key) if self.prefetcher else None
        if fut is not None:
            t0 = time.perf_counter()
            value = fut.result()
            s.stall_seconds += time.perf_counter() - t0
            v = self.cache.access(key)
            s.late += 1
            s.prefetch_used += was_prefetched
            return v if v is not None else value
        v = self.cache.access(key)
        if v is not None and (cheap or v.precision == self.full_precision):
            s.hits += 1
            s.prefetch_used += was_prefetched
            return v
        s.misses += 1
        if v is not None:  # only a low-precision copy is here and this use needs the full expert
            s.upgrades += 1
            v = self._read(key)
            self.cache.replace(key, v, v.nbytes)
            return v
        low = cheap and self.lowp is not None
        v = self._read(key, self.lowp if low else "full")
        s.lowp_reads += low
        self.cache.put(key, v, v.nbytes)
        return v

    def _resident(self, l: int) -> torch.Tensor:
        """Layer l's experts in RAM or on their way there (a prefetch in flight): what cache-aware routing
        favours. Counting in-flight reads makes the choice depend less on how fast the read went."""
        with self.cache.lock:
            here = {e for (k, e) in self.cache.items if k == l}
        if self.prefetcher is not None:
            with self.prefetcher.lock:
                here |= {e for (k, e) in self.prefetcher.inflight if k == l}
        return torch.tensor([e in here for e in range(self.cfg.experts)])

    def _guess(self, l: int, x: torch.Tensor) -> Key | None:
        """Layer l+1's router on layer l's hidden state: its predicted top expert (returned) and the reads
        of its predicted `prefetch_k` experts, ranked as cache-aware routing will rank them."""
        if self.prefetcher is None or l + 1 >= self.cfg.layers:
            return None
        nxt = self.model.blocks[l + 1]
        logits = nxt.moe.router(nxt.ln2(x)).view(-1)
        if self.route_margin > 0:
            logits = logits + self.route_margin * self._resident(l + 1).to(logits.dtype)
        ranked = logits.topk(self.prefetch_k).indices.tolist()
        for e in ranked:
            self._prefetch((l + 1, e))
        return (l + 1, ranked[0])

    def _prefetch(self, key: Key) -> None:
        if self.prefetcher.request(key):
            with self._plock:
                self._prefetched.add(key)
            self.stats.prefetch_issued += 1

    # ---- decoding ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Starts a new sequence (clears the attention KV cache; the expert cache stays warm)."""
        self.past = [None] * self.cfg.layers
        self.pos = 0

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feeds one byte, returns the next-byte logits (256,)."""
        if self.pos >= self.cfg.context:
            raise TinyshieldError(f"context of {self.cfg.context} tokens is full; call reset()")
        m = self.model
        x = m.embed(torch.tensor([[token]]), self.pos)
        guess = None  # (l, e) predicted for the current layer by the previous one, when prefetching
        for l, blk in enumerate(m.blocks):
            a, self.past[l] = blk.attn(blk.ln1(x), self.past[l])
            x = x + a
            next_guess = self._guess(l, x) if self.prefetch_at == "attn" else None
            h = blk.ln2(x).view(1, -1)
            logits = blk.moe.router(h)
            idx, w = route(logits, self.cfg.top_k)
            idx, w = idx[0].tolist(), w[0]
            if self.route_margin > 0 and self.cache is not None:
                plain = set(idx)
                idx, w = cache_aware_route(logits[0], self.cfg.top_k, self._resident(l), self.route_margin)
                self.stats.reroutes += set(idx) != plain
            if guess is not None:
                self.stats.predictions += 1
                self.stats.predictions_right += guess == (l, idx[0])
            if self.gating is not None and len(idx) > 1 and not self.gating.keep_second(l, float(w[1])):
                idx, w = idx[:1], torch.ones(1)
            y = torch.zeros_like(h)
            # Resident experts first: a miss served first could evict (with one slot per layer, would evict)
            # the expert that was about to hit. The sum is the same in any order (two terms commute exactly).
            order = sorted(range(len(idx)), key=lambda j: self.cache is not None and (l, idx[j]) not in self.cache)
            for j in order:
                e = idx[j]
                cheap = self.lowp_only or (self.lowp is not None and float(w[j]) < self.lowp_max_weight)
                y += w[j] * self.expert((l, e), cheap).ffn(h)
            self.stats.experts_activated += len(idx)
            x = x + y.view_as(x)
            guess = self._guess(l, x) if self.prefetch_at == "ffn" else next_guess
        self.pos += 1
        self.stats.tokens += 1
        return m.head(m.ln_f(x))[0, 0]

    def score(self, ids: torch.Tensor) -> RunStats:
        """Teacher-forced next-byte NLL over `ids` in windows of the model's context (perplexity)."""
        t0 = time.perf_counter()
        T = self.cfg.context
        for i in range(0, len(ids) - 1, T):
            window = ids[i:i + T + 1]
            self.reset()
            for j in range(len(window) - 1):
                logits = self.step(int(window[j]))
                self.stats.nll_sum += float(F.cross_entropy(logits[None], window[j + 1:j + 2]))
                self.stats.nll_count += 1
        self._finish(t0)
        return self.stats

    def generate(self, prompt: torch.Tensor, n: int, temperature: float = 0.8, seed: int = 0) -> list[int]:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        out = [int(t) for t in prompt]
        if not out:
            raise TinyshieldError("the prompt is empty: give at least one character")
        self.reset()
        ctx = out[-self.cfg.context:]
        for t in ctx:
            logits = self.step(t)
        for _ in range(n):
            probs = (logits / max(temperature, 1e-4)).softmax(-1)
            nxt = int(torch.multinomial(probs, 1, generator=g)) if temperature > 0 else int(logits.argmax())
            out.append(nxt)
            if self.pos >= self.cfg.context:  # slide: re-read the last half of the window
                self.reset()
                for t in out[-self.cfg.context // 2:-1]:
                    self.step(t)
            logits = self.step(nxt)
        self._finish(t0)
        return out

    def _finish(self, t0: float) -> None:
        self.stats.wall_seconds += time.perf_counter() - t0
        self.stats.bytes_read = self.store.bytes_read
        self.stats.device_seconds = self.store.device.modelled_seconds if self.store.device is not None else 0.0

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

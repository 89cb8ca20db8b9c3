"""Expert cache and policies: byte budget always holds, Belady is the ceiling, DP allocation is optimal."""
import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.moe.cache import ExpertCache, replay
from edge.moe.policies import LFU, Belady, LayerLRU, NoCache, allocate_slots, even_slots, lru_hit_curve

L, E = 3, 4
keys = st.tuples(st.integers(0, L - 1), st.integers(0, E - 1))


def online_policies(slots):
    return {"lru": LayerLRU(even_slots(L, E, slots)), "lfu": LFU(), "on-demand": NoCache(),
            "dp-lru": LayerLRU(allocate_slots([[0, 3, 4, 5, 5]] * L, slots))}


@settings(max_examples=150, deadline=None)
@given(trace=st.lists(keys, max_size=120), budget=st.integers(0, 4000),
       sizes=st.lists(st.integers(1, 900), min_size=L * E, max_size=L * E),
       which=st.sampled_from(["lru", "lfu", "on-demand", "belady", "dp-lru"]))
def test_cache_never_exceeds_byte_budget(trace, budget, sizes, which):
    policy = Belady(trace) if which == "belady" else online_policies(budget // 300)[which]
    cache = ExpertCache(budget, policy)
    size = {k: sizes[k[0] * E + k[1]] for k in itertools.product(range(L), range(E))}
    for k in trace:
        if cache.access(k) is None:
            cache.put(k, object(), size[k])
        assert cache.used <= budget
        assert cache.used == sum(size[k] for k in cache.items)
    assert cache.stats.peak_bytes <= budget


@settings(max_examples=150, deadline=None)
@given(trace=st.lists(keys, max_size=150), slots=st.integers(0, L * E))
def test_belady_hit_rate_is_at_least_every_online_policy(trace, slots):
    best = replay(trace, slots, Belady(trace)).hits
    for name, policy in online_policies(slots).items():
        assert replay(trace, slots, policy).hits <= best, name


def test_belady_matches_brute_force_optimum_on_small_traces():
    """MIN with bypass is optimal: compare with an exhaustive search over eviction choices."""
    rng = random.Random(0)

    def brute(trace, cap, resident=frozenset(), i=0):
        if i == len(trace):
            return 0
        k = trace[i]
        if k in resident:
            return 1 + brute(trace, cap, resident, i + 1)
        options = [resident]  # bypass
        if len(resident) < cap:
            options.append(resident | {k})
        else:
            options += [(resident - {v}) | {k} for v in resident]
        return max(brute(trace, cap, r, i + 1) for r in options)

    for _ in range(40):
        trace = [(0, rng.randrange(4)) for _ in range(rng.randrange(1, 9))]
        cap = rng.randrange(0, 4)
        assert replay(trace, cap, Belady(trace)).hits == brute(trace, cap)


def test_lru_is_per_layer_and_evicts_least_recent():
    cache = ExpertCache(4, LayerLRU([2, 2]))
    for k in [(0, 0), (0, 1), (1, 0), (0, 0), (0, 2)]:  # (0,1) is the least recent in layer 0
        if cache.access(k) is None:
            cache.put(k, True, 1)
    assert set(cache.items) == {(0, 0), (0, 2), (1, 0)}


def test_lru_hit_curve_matches_replay():
    rng = random.Random(1)
    trace = [(rng.randrange(2), rng.randrange(5)) for _ in range(300)]
    curve = lru_hit_curve(trace, 1, 5)
    for s in range(6):
        layer_only = [k for k in trace if k[0] == 1]
        assert curve[s] == replay(layer_only, s, LayerLRU([0, s])).hits


def test_dp_allocation_is_optimal():
    rng = random.Random(2)
    for _ in range(30):
        curves = [sorted(rng.sample(range(50), 4)) for _ in range(3)]
        curves = [[0] + c for c in curves]  # 0..4 slots
        total = rng.randrange(0, 13)
        got = allocate_slots(curves, total)
        assert sum(got) <= total
        best = max(sum(curves[l][s] for l, s in enumerate(p))
                   for p in itertools.product(range(5), repeat=3) if sum(p) <= total)
        assert sum(curves[l][s] for l, s in enumerate(got)) == best


def test_on_demand_caches_nothing():
    stats = replay([(0, 1)] * 5, 10, NoCache())
    assert stats.hits == 0 and stats.inserts == 0

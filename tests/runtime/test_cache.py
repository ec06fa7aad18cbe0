"""ExpertCache: pinned copies never leave, policies pick the hand-computed victim, Belady is optimal."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from dymoe.errors import BudgetError
from dymoe.runtime.cache import AllPinnedError, BeladyPolicy, ExpertCache, LFUPolicy, LRUPolicy, make_policy
from dymoe.runtime.metrics import RuntimeMetrics
from dymoe.runtime.slot_pool import SlotPool

A, B, C, D, E = (0, 0), (0, 1), (1, 0), (1, 1), (2, 0)


def cache_of(slots: int, policy="lru", classes=("bf16",), on_evict=None) -> ExpertCache:
    pool = SlotPool("cpu", {c: 64 for c in classes}, {c: slots for c in classes})
    return ExpertCache(pool, policy, on_evict=on_evict)


def test_lru_victim_on_known_sequence():
    cache = cache_of(3, "lru")
    for key in (A, B, C):
        cache.insert(key, "bf16")
    cache.lookup(A)
    assert cache.insert(D, "bf16")[1] == [B]  # A was used after B
    cache.lookup(C)
    assert cache.insert(E, "bf16")[1] == [A]  # order now: A, D, C (C used last)


def test_lfu_victim_and_recency_tie_break():
    cache = cache_of(3, "lfu")
    for key in (A, B, C):
        cache.insert(key, "bf16")  # one use each
    cache.lookup(A)
    cache.lookup(A)
    cache.lookup(C)
    assert cache.insert(D, "bf16")[1] == [B]  # uses: A 3, B 1, C 2
    assert cache.insert(E, "bf16")[1] == [D]  # D 1 use, fewer than C
    cache.lookup(E)
    assert cache.insert(B, "bf16")[1] == [C]  # C 2 and E 2 uses tie: C was used longer ago


def test_lfu_counts_survive_eviction():
    policy = LFUPolicy()
    cache = ExpertCache(SlotPool("cpu", {"bf16": 8}, {"bf16": 1}), policy)
    cache.insert(A, "bf16")
    cache.lookup(A)
    cache.insert(B, "bf16")  # evicts A
    assert policy.uses[A] == 2


@pytest.mark.parametrize("trace, expected", [
    ([A, B, C, A, B, D, A, C, A], [B]),  # at D: A and C come back, B never does
    ([A, B, C, A, B, D, A, B, C], [C, A]),  # at D: C comes back last; at the last C none does: smallest key
])
def test_belady_evicts_furthest_next_use(trace, expected):
    cache = cache_of(3, lambda: BeladyPolicy(trace))
    evicted = []
    for key in trace:
        if cache.lookup(key) is None:
            evicted += cache.insert(key, "bf16")[1]
    assert evicted == expected


def test_belady_rejects_uses_off_the_trace():
    cache = cache_of(2, lambda: BeladyPolicy([A, B]))
    with pytest.raises(ValueError, match="trace"):
        cache.insert(B, "bf16")


def test_pinned_copies_are_never_evicted_and_all_pinned_is_a_budget_error():
    cache = cache_of(2)
    cache.insert(A, "bf16")
    cache.insert(B, "bf16")
    cache.pin(A)
    assert cache.insert(C, "bf16")[1] == [B]
    cache.pin(C)
    assert cache.make_room("bf16") is None
    with pytest.raises(AllPinnedError, match="--device-memory") as err:
        cache.insert(D, "bf16")
    assert isinstance(err.value, BudgetError)
    with pytest.raises(ValueError):
        cache.remove(A)
    cache.unpin(A)
    assert cache.insert(D, "bf16")[1] == [A]


def test_prefetched_copy_arrives_without_a_use():
    metrics = RuntimeMetrics()
    cache = cache_of(2, "lfu", on_evict=metrics.evicted)
    cache.insert(A, "bf16")
    cache.insert(B, "bf16", prefetched=True)
    assert cache.is_prefetched(B) and cache.peek(B) is not None and cache.is_prefetched(B)
    assert cache.lookup(B) == ("bf16", 1)
    cache.pin(B)
    assert not cache.is_prefetched(B)
    cache.unpin(B)
    cache.insert(C, "bf16")  # A and B: one use each, A older
    assert C in cache and A not in cache
    assert metrics.layer(0).evictions == 1


def test_classes_have_separate_policies_and_slots():
    cache = cache_of(1, LRUPolicy, classes=("bf16", "int4"))
    cache.insert(A, "bf16")
    cache.insert(B, "int4")
    assert cache.insert(C, "int4")[1] == [B]  # the bf16 copy is not a candidate
    assert cache.resident("bf16") == [A] and cache.resident("int4") == [C]
    with pytest.raises(ValueError):
        ExpertCache(SlotPool("cpu", {"a": 1, "b": 1}, {}), LRUPolicy())  # one instance, two classes
    with pytest.raises(ValueError):
        make_policy("fifo")


def test_drop_layer_keeps_pinned():
    cache = cache_of(4)
    for key in (A, B, C):
        cache.insert(key, "bf16")
    cache.pin(B)
    cache.drop_layer(0)
    assert cache.resident() == [B, C]


# -- differential tests against brute-force reference policies ---------------------------------------

def reference_victim(name, candidates, last, uses):
    if name == "lru":
        return min(candidates, key=lambda k: last[k])
    return min(candidates, key=lambda k: (uses.get(k, 0), last[k]))


operations = st.lists(st.tuples(st.sampled_from(["use", "prefetch", "pin", "unpin"]),
                                st.integers(0, 2), st.integers(0, 4)), max_size=80)


@pytest.mark.parametrize("name", ["lru", "lfu"])
@settings(max_examples=120, deadline=None)
@given(slots=st.integers(1, 5), ops=operations)
def test_policy_matches_reference_and_never_evicts_pinned(name, slots, ops):
    cache = cache_of(slots, name)
    last, uses, pins, clock = {}, {}, {}, 0
    for op, layer, expert in ops:
        key = (layer, expert)
        clock += 1
        if op in ("use", "prefetch"):
            if op == "use" and cache.lookup(key) is not None:
                last[key], uses[key] = clock, uses.get(key, 0) + 1
                continue
            if key in cache:
                continue
            candidates = [k for k in cache.resident() if not pins.get(k)]
            full = len(cache) == slots
            if full and not candidates:
                with pytest.raises(AllPinnedError):
                    cache.insert(key, "bf16", prefetched=op == "prefetch")
                continue
            expected = [reference_victim(name, candidates, last, uses)] if full else []
            _, evicted = cache.insert(key, "bf16", prefetched=op == "prefetch")
            assert evicted == expected
            for k in evicted:
                del last[k]
            last[key] = clock
            if op == "use":
                uses[key] = uses.get(key, 0) + 1
        elif op == "pin" and key in cache:
            cache.pin(key)
            pins[key] = pins.get(key, 0) + 1
        elif op == "unpin" and pins.get(key):
            cache.unpin(key)
            pins[key] -= 1
        for k, n in pins.items():
            assert not n or k in cache, "a pinned copy was evicted"
        assert cache.pool.num_slots("bf16") - cache.pool.num_free("bf16") == len(cache)


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_belady_hits_at_least_lru_and_lfu(slots, seed):
    rng = random.Random(seed)
    trace = [(rng.randrange(3), rng.randrange(5)) for _ in range(60)]

    def hits(policy):
        cache = cache_of(slots, policy)
        n = 0
        for key in trace:
            if cache.lookup(key) is not None:
                n += 1
            else:
                cache.insert(key, "bf16")
        return n

    oracle = hits(lambda: BeladyPolicy(trace))
    assert oracle >= hits("lru") and oracle >= hits("lfu")


@pytest.mark.parametrize("policy", ["lru", "lfu", "arc", "least-stale"])
def test_use_resident_is_lookup_then_pin_for_each_key(policy):
    """The batched hit path leaves the cache as lookup + pin per key would (uses counted in
    order, pins, prefetched flags, the victim order after), reports the prefetched copies it
    hit, and changes nothing when a key is missing or at another precision."""
    def filled():
        cache = cache_of(4, policy, classes=("bf16", "int4"))
        for key in (A, B, C):
            cache.insert(key, "bf16")
        cache.insert(D, "bf16", prefetched=True)
        cache.insert(E, "int4")
        return cache

    batched, looped = filled(), filled()
    assert batched.use_resident([D, A, C], "bf16") == 1
    for key in (D, A, C):
        looped.lookup(key)
        looped.pin(key)
    assert batched.clock == looped.clock
    for key in (A, B, C, D):
        assert (batched.is_pinned(key), batched.is_prefetched(key)) == (looped.is_pinned(key), looped.is_prefetched(key))
    batched.unpin_all([D, A, C])
    for key in (D, A, C):
        looped.unpin(key)
    assert batched.slots([C, A]) == [looped.peek(C).slot, looped.peek(A).slot]
    incoming = (3, 0)
    assert batched.insert(incoming, "bf16")[1] == looped.insert(incoming, "bf16")[1]  # the same victim
    before = (filled().clock, [k for k in (A, B, C, D, E) if filled().is_pinned(k)])
    for keys, precision in (([A, (5, 5)], "bf16"), ([A, E], "bf16"), ([E], "bf16")):
        cache = filled()
        assert cache.use_resident(keys, precision) is None
        assert (cache.clock, [k for k in (A, B, C, D, E) if cache.is_pinned(k)]) == before
        assert cache.is_prefetched(D)
    with pytest.raises(KeyError, match="not resident"):
        filled().slots([(5, 5)])


@pytest.mark.parametrize("policy", ["lru", "lfu", "least-stale"])
def test_choose_victims_is_the_policys_eviction_order(policy):
    """Several victims at once (the mapped decode's ring): the copies the policy would evict one
    after another, pinned ones skipped, none evicted or left pinned; at most as many as are
    unpinned. LRU answers in one pass over its order, the others through ``victim``."""
    rng = random.Random(3)
    cache, twin = cache_of(12, policy), cache_of(12, policy)
    keys = [(layer, e) for layer in range(3) for e in range(4)]
    for key in keys:
        for c in (cache, twin):
            c.insert(key, "bf16")
    for key in rng.sample(keys * 2, 20):
        for c in (cache, twin):
            c.lookup(key)
    for c in (cache, twin):
        c.pin(keys[5])
    chosen = cache.choose_victims("bf16", 6)
    expected = []
    for _ in range(6):  # the same policy state, evicting for real
        victim = twin.policies["bf16"].victim(twin._evictable["bf16"], None)
        expected.append(victim)
        twin.remove(victim)
    assert chosen == expected and keys[5] not in chosen
    assert len(cache) == 12 and [k for k in keys if cache.is_pinned(k)] == [keys[5]]
    assert len(cache.choose_victims("bf16", 99)) == 11

"""SlotPool: the budget is a hard limit, no slot is handed out twice, resplit moves only free slots."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dymoe.errors import BudgetError
from dymoe.runtime.slot_pool import ALIGN, SlotPool, format_size, round_up

MiB = 1 << 20
CLASSES = ("bf16", "int4", "int2")


@st.composite
def pool_specs(draw):
    classes = draw(st.lists(st.sampled_from(CLASSES), min_size=1, max_size=3, unique=True))
    slot_bytes = {c: draw(st.integers(1, 5000)) for c in classes}
    split = {}
    for c in classes:
        if draw(st.booleans()):
            split[c] = draw(st.integers(0, 6))
    fractions = [c for c in classes if c not in split]
    weights = [draw(st.integers(0, 10)) for _ in fractions]
    for c, w in zip(fractions, weights):
        split[c] = w / max(sum(weights), 1)
    min_slots = {c: draw(st.integers(0, 4)) for c in classes}
    budget = draw(st.integers(0, 60_000))
    reserved = draw(st.integers(0, 5_000))
    return budget, slot_bytes, split, min_slots, reserved


@settings(max_examples=300, deadline=None)
@given(pool_specs())
def test_plan_never_exceeds_budget(spec):
    budget, slot_bytes, split, min_slots, reserved = spec
    stride = {c: round_up(b, ALIGN) for c, b in slot_bytes.items()}
    minimum = reserved + sum(stride[c] * n for c, n in min_slots.items())
    try:
        counts = SlotPool.plan(budget, slot_bytes, split, min_slots=min_slots, reserved_bytes=reserved)
    except BudgetError as err:
        assert "--device-memory" in str(err)
        fixed = sum(stride[c] * max(v, min_slots[c]) for c, v in split.items() if isinstance(v, int))
        assert budget < minimum or budget < reserved + fixed + sum(
            stride[c] * min_slots[c] for c in slot_bytes if not isinstance(split.get(c), int))
        return
    assert budget >= minimum
    assert reserved + sum(stride[c] * n for c, n in counts.items()) <= budget
    for c in slot_bytes:
        assert counts[c] >= min_slots[c]
        if isinstance(split.get(c), int):
            assert counts[c] == max(split[c], min_slots[c])
    pool = SlotPool("cpu", slot_bytes, counts)
    assert pool.capacity_bytes <= budget - reserved


def test_plan_follows_fractions_and_fills_leftover():
    # strides 1024 and 512; 2 bf16 minimum leave 7952 bytes, half each: 3 bf16 + 7 int4 fit, and
    # the 1296 bytes left take one more bf16 (the larger remainder).
    counts = SlotPool.plan(10_000, {"bf16": 1000, "int4": 300}, {"bf16": 0.5, "int4": 0.5}, min_slots={"bf16": 2})
    assert counts == {"bf16": 6, "int4": 7}


def test_budget_error_names_minimum_and_flag():
    with pytest.raises(BudgetError) as err:
        SlotPool.plan(3 * MiB, {"bf16": MiB}, {"bf16": 1.0}, min_slots={"bf16": 8}, reserved_bytes=MiB // 2)
    message = str(err.value)
    assert "8.50 MiB" in message and "--device-memory" in message and "8 bf16 slots of 1.00 MiB" in message
    with pytest.raises(BudgetError, match=r"2\.50 GiB"):
        SlotPool.plan(1 << 30, {"bf16": 512 * MiB}, {"bf16": 1.0}, min_slots={"bf16": 5})


def test_format_size_rounds_up():
    assert format_size(MiB + 1) == "1.01 MiB"
    assert format_size(3 << 30) == "3.00 GiB"


def test_acquire_is_lowest_free_and_views_are_views():
    pool = SlotPool("cpu", {"bf16": 1000, "int4": 100}, {"bf16": 3, "int4": 2})
    assert [pool.acquire("bf16") for _ in range(4)] == [0, 1, 2, None]
    pool.release("bf16", 1)
    assert pool.acquire("bf16") == 1
    view = pool.view("int4", 1)
    assert view.numel() == 100 and view.dtype == torch.uint8
    assert view.untyped_storage().data_ptr() == pool.buffer.untyped_storage().data_ptr()
    assert pool.view("int4", 1) is view  # precomputed, not rebuilt per call
    assert pool.offset("int4", 1) % ALIGN == 0
    with pytest.raises(ValueError):
        pool.release("int4", 0)  # never acquired


def _live_ranges(pool):
    return [(pool.offset(c, s), pool.offset(c, s) + pool.slot_bytes(c), c, s)
            for c in pool.classes for s, o in enumerate(pool._offsets[c]) if o is not None]


ops = st.lists(st.tuples(st.sampled_from(["acquire", "release", "resplit"]), st.integers(0, 2),
                         st.lists(st.integers(0, 12), min_size=3, max_size=3)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=3, max_size=3), st.lists(st.integers(0, 6), min_size=3, max_size=3), ops)
def test_random_operations_keep_slots_disjoint(sizes, counts, operations):
    slot_bytes = dict(zip(CLASSES, sizes))
    pool = SlotPool("cpu", slot_bytes, dict(zip(CLASSES, counts)))
    capacity, base = pool.capacity_bytes, pool.buffer.data_ptr()
    in_use: dict[tuple[str, int], int] = {}  # (class, slot) -> the byte written into it
    for n, (op, which, target) in enumerate(operations):
        cls = CLASSES[which]
        if op == "acquire":
            slot = pool.acquire(cls)
            if slot is None:
                assert pool.num_free(cls) == 0
                continue
            assert (cls, slot) not in in_use, "slot handed out twice"
            in_use[(cls, slot)] = n % 256
            pool.view(cls, slot).fill_(n % 256)
        elif op == "release" and any(c == cls for c, _ in in_use):
            slot = min(s for c, s in in_use if c == cls)
            pool.release(cls, slot)
            del in_use[(cls, slot)]
        elif op == "resplit":
            reached = pool.resplit(dict(zip(CLASSES, target)))
            for c in CLASSES:
                assert reached[c] >= sum(1 for k in in_use if k[0] == c)
        ranges = sorted(_live_ranges(pool))
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), "slots overlap"
        assert all(0 <= r[0] and r[1] <= capacity for r in ranges)
        assert pool.capacity_bytes == capacity and pool.buffer.data_ptr() == base  # never reallocated
        for (c, s), value in in_use.items():  # nothing in use moved or was overwritten
            assert bool((pool.view(c, s) == value).all())


def test_resplit_moves_whole_free_slots_only():
    pool = SlotPool("cpu", {"bf16": 1024, "int4": 256}, {"bf16": 4, "int4": 0})
    busy = [pool.acquire("bf16") for _ in range(3)]
    assert pool.resplit({"bf16": 0, "int4": 8}) == {"bf16": 3, "int4": 4}  # only one bf16 slot was free
    for slot in busy:
        pool.release("bf16", slot)
    assert pool.resplit({"bf16": 1, "int4": 16}) == {"bf16": 1, "int4": 12}
    assert pool.resplit({"int4": 0, "bf16": 4}) == {"bf16": 4, "int4": 0}  # holes merge back
    assert pool.capacity_bytes == 4 * 1024

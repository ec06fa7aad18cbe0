"""TransferEngine: bytes land exactly and are counted; on CUDA, copies overlap compute only where safe."""

from __future__ import annotations

import json

import pytest
import torch

from dymoe.runtime.metrics import RuntimeMetrics
from dymoe.runtime.transfer import TransferEngine

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def blob(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("threaded", [False, True])
def test_cpu_copies_bytes_exactly_and_counts_them(threaded):
    metrics = RuntimeMetrics()
    with TransferEngine("cpu", metrics, threaded=threaded) as engine:
        sizes = [1, 255, 4096, 70_001]
        srcs = [blob(n, i) for i, n in enumerate(sizes)]
        dsts = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
        tickets = [engine.fetch((i % 2, i), s, d) for i, (s, d) in enumerate(zip(srcs, dsts))]
        for ticket in tickets:
            engine.wait(ticket)
            assert engine.is_done(ticket) and engine.pending(ticket.key) is None
        assert all(torch.equal(s, d) for s, d in zip(srcs, dsts))
        assert engine.bytes_moved == sum(sizes) and engine.transfers == 4
        assert metrics.layer(0).h2d_bytes == 1 + 4096 and metrics.layer(1).h2d_bytes == 255 + 70_001
        assert engine.stall_seconds >= 0 and metrics.total().stall_seconds == pytest.approx(engine.stall_seconds)


def test_cpu_synchronous_tickets_come_back_done():
    engine = TransferEngine("cpu")
    ticket = engine.fetch((0, 0), blob(10, 0), torch.zeros(10, dtype=torch.uint8))
    assert engine.is_done(ticket) and ticket.waited and engine.pending((0, 0)) is None
    engine.wait(ticket)  # a no-op


def test_threaded_copies_into_one_slot_land_in_fetch_order():
    # A slot reused while an earlier copy into it is queued (an evicted prefetch): the newest wins.
    dst = torch.zeros(1 << 16, dtype=torch.uint8)
    with TransferEngine("cpu", threaded=True) as engine:
        old = engine.fetch((0, 1), blob(1 << 16, 1), dst)
        assert engine.pending((0, 1)) is old
        new = engine.fetch((0, 2), blob(1 << 16, 2), dst)
        engine.synchronize()
        assert engine.is_done(old) and engine.is_done(new)
    assert torch.equal(dst, blob(1 << 16, 2))


def test_size_or_dtype_mismatch_is_refused():
    engine = TransferEngine("cpu")
    with pytest.raises(ValueError, match=r"expert \(3, 4\)"):
        engine.fetch((3, 4), blob(10, 0), torch.zeros(11, dtype=torch.uint8))
    with pytest.raises(ValueError):
        engine.fetch((3, 4), blob(10, 0).float(), torch.zeros(10, dtype=torch.uint8))


def test_metrics_report():
    metrics = RuntimeMetrics()
    metrics.hit(0)
    metrics.hit(0, prefetched=True)
    metrics.miss(0, 1 << 20)
    metrics.miss(2)
    metrics.prefetch(0)
    metrics.transfer(0, 3 << 20)
    metrics.stall(2, 0.004)
    metrics.evicted((2, 7))
    metrics.tokens_seen(0, 5)
    metrics.tokens_seen(2, 5)
    total = metrics.total()
    assert (total.hits, total.misses, total.prefetch_hits, total.evictions, total.tokens) == (2, 2, 1, 1, 5)
    assert total.hit_rate == 0.5
    data = json.loads(json.dumps(metrics.to_dict()))
    assert data["layers"]["0"]["missed_bytes"] == 1 << 20 and data["total"]["stall_seconds"] == 0.004
    table = metrics.format_table()
    assert "total" in table and "5 tokens: 0.60 MiB H2D and 0.80 ms stall per token" in table
    metrics.reset()
    assert metrics.total().hits == 0 and metrics.to_dict()["layers"] == {}


# -- CUDA (run on the GPU machine; skipped here) ------------------------------------------------------

SLEEP = 200_000_000  # GPU cycles, ~0.1 s: long enough to see which stream waited for which


@cuda
@pytest.mark.parametrize("pinned, staging_bytes", [(True, 8 << 20), (False, 8 << 20), (False, 4096)])
def test_cuda_copies_exactly_then_compute_reads_them(pinned, staging_bytes):
    engine = TransferEngine("cuda", staging_bytes=staging_bytes, staging_buffers=2)
    src = blob(100_003, 7)
    src = src.pin_memory() if pinned else src
    dst = torch.zeros(100_003, dtype=torch.uint8, device="cuda")
    ticket = engine.fetch((1, 2), src, dst)
    engine.wait(ticket)
    copied = dst.clone()  # on the compute stream, after the wait
    assert torch.equal(copied.cpu(), src)
    assert engine.is_done(ticket) and engine.metrics.layer(1).h2d_bytes == 100_003
    engine.close()


@cuda
def test_cuda_same_slot_fetches_land_in_order_across_paths():
    engine = TransferEngine("cuda", staging_bytes=4096)
    dst = torch.zeros(50_000, dtype=torch.uint8, device="cuda")
    engine.fetch((0, 0), blob(50_000, 1), dst)  # staged, on the background thread
    last = engine.fetch((0, 1), blob(50_000, 2).pin_memory(), dst)  # pinned: must queue behind it
    engine.wait(last)
    assert torch.equal(dst.cpu(), blob(50_000, 2))
    engine.close()


@cuda
@pytest.mark.parametrize("fenced", [False, True])
def test_cuda_copy_waits_for_compute_only_up_to_the_fence(fenced):
    engine = TransferEngine("cuda")
    dst = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    if fenced:
        engine.fence()
    torch.cuda._sleep(SLEEP)  # the current layer's compute, queued after the fence
    compute_done = torch.cuda.Event()
    compute_done.record()
    ticket = engine.fetch((0, 0), blob(1 << 20, 3).pin_memory(), dst)
    ticket.event.synchronize()
    assert compute_done.query() is (not fenced)  # fenced: the prefetch overlapped the compute
    torch.cuda.synchronize()
    engine.close()


@cuda
def test_cuda_fence_protects_a_slot_still_being_read():
    engine = TransferEngine("cuda")
    slot = torch.full((1 << 20,), 7, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(SLEEP)
    read = slot.clone()  # the last compute that reads the old expert, still queued
    engine.fence()  # after unpinning it
    engine.wait(engine.fetch((0, 1), torch.full((1 << 20,), 9, dtype=torch.uint8).pin_memory(), slot))
    after = slot.clone()
    assert bool((read == 7).all()) and bool((after == 9).all())
    engine.close()


@cuda
def test_cuda_stall_is_measured_with_events():
    metrics = RuntimeMetrics()
    engine = TransferEngine("cuda", metrics, measure_stalls=True)
    with torch.cuda.stream(engine.stream):
        torch.cuda._sleep(SLEEP)  # a slow link
    dst = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    engine.wait(engine.fetch((5, 0), blob(4096, 0).pin_memory(), dst))
    assert engine.stall_seconds > 0.01 and metrics.layer(5).stall_seconds == pytest.approx(engine.stall_seconds)
    engine.close()


def test_index_upload_rows_hold_the_last_values_at_fixed_addresses():
    """IndexUpload: each upload's values land in its row (int64, the first n entries), a row's
    device view keeps its address from call to call (what a CUDA graph recorded reads), and
    rows do not disturb one another."""
    from dymoe.runtime.transfer import IndexUpload

    upload = IndexUpload(4, "cpu", rows=2)
    first = upload([3, 1, 2], row=0)
    other = upload([7, 7, 7, 7], row=1)
    assert first.tolist() == [3, 1, 2] and first.dtype == torch.int64
    again = upload([5, 0, 9], row=0)
    assert again.data_ptr() == first.data_ptr() == upload.row(0, 3).data_ptr()
    assert upload.row(0, 3).tolist() == [5, 0, 9] and other.tolist() == [7, 7, 7, 7]
    assert upload([2**40, -1], row=0).tolist() == [2**40, -1]  # int64, not narrowed

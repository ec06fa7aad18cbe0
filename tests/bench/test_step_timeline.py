"""benchmarks/step_timeline.py: the summary of a traced step, from hand-made trace rows (the
stamps themselves need a GPU: the compiled test at the end), and launch_decode(trace=)'s checks."""

import numpy as np
import pytest
import torch

from tests.interpreted import needs_gpu, needs_triton
from tests.scripts import load_script


def _module():
    return load_script("benchmarks", "step_timeline")


def rows(*programs):
    """Trace rows [programs, 8] from (start, waited, summed, counted, finished, sm) in ns."""
    out = np.zeros((len(programs), 8), dtype=np.int64)
    out[:, :6] = programs
    return out


def shifted(trace, ns):
    """``trace`` ``ns`` later: its stamps, not its zeros or SMs."""
    out = trace.copy()
    out[:, :5] += np.where(out[:, :5] > 0, ns, 0)
    return out


T0 = 1_000_000
GATE_UP = rows((T0, T0 + 900, T0 + 4000, T0 + 4600, 0, 0),
               (T0 + 300, T0 + 1000, T0 + 5000, T0 + 5500, T0 + 6400, 1),  # the finisher
               (T0 + 200, T0 + 950, T0 + 4500, T0 + 5000, 0, 2))
DOWN = rows((T0 + 3000, T0 + 7000, T0 + 8000, T0 + 8700, 0, 0),
            (T0 + 6500, T0 + 7400, T0 + 8200, T0 + 9000, T0 + 10300, 3))


def test_step_points_are_microseconds_after_the_first_gate_up_start():
    points = _module().step_points(GATE_UP, DOWN, T0 + 12000)
    assert points["gate_up started"] == 0.3 and points["gate_up waited"] == 1.0
    assert points["gate_up summed (median)"] == 4.5 and points["gate_up summed"] == 5.0
    assert points["gate_up counted"] == 5.5 and points["h"] == 6.4
    assert points["down first start"] == 3.0 and points["down first waited"] == 7.0
    assert points["down waited"] == 7.4 and points["down summed (median)"] == 8.1 and points["down summed"] == 8.2
    assert points["end"] == 10.3 and points["next"] == 12.0
    assert points["down started before h"] == 1  # the one started at 3.0, before h at 6.4
    assert points["gate_up finishers"] == 1 and points["down finishers"] == 1
    assert points["programs"] == (3, 2) and points["sms"] == (3, 2) and points["in order"]


def test_step_points_flags_stamps_out_of_order_and_a_trace_without_finishers():
    module = _module()
    late_wait = DOWN.copy()
    late_wait[0, 1] = T0 + 8500  # waited after its sums
    assert not module.step_points(GATE_UP, late_wait, None)["in order"]
    no_finisher = DOWN.copy()
    no_finisher[:, 4] = 0
    with pytest.raises(ValueError, match="no finisher stamps"):
        module.step_points(GATE_UP, no_finisher, None)


def test_timeline_takes_medians_over_the_steps_after_the_first_ones():
    module = _module()
    traces = [(shifted(GATE_UP, shift), shifted(DOWN, shift)) for shift in (0, 20_000, 40_000, 60_000, 80_000)]
    traces[3][1][1, 4] += 2000  # one step's end 2 us later: the median ignores it
    summary = module.timeline(traces, skip=2)
    assert summary["end"] == 10.3 and summary["next"] == 20.0  # the last step has no next
    assert summary["in order"] and summary["programs"] == (3, 2)
    assert summary["timer_step_ns"] == 50  # 950 -> 1000 ns: the finest distinct step among the stamps
    with pytest.raises(ValueError, match="nothing to summarise"):
        module.timeline(traces[:2], skip=2)


@needs_triton
def test_trace_buffers_are_checked_before_any_launch():
    from dymoe.quant.kernels.triton_experts import _Launch, _trace_args

    gate_up = _Launch(kernel=None, grid=(8, 6, 8), kwargs={}, split=8)
    down = _Launch(kernel=None, grid=(8, 16, 3), kwargs={}, split=3)
    good = (torch.zeros(8 * 6 * 8 * 8, dtype=torch.int64), torch.zeros(8 * 16 * 3 * 8, dtype=torch.int64))
    assert _trace_args(good, gate_up, down) == (dict(TRACE=True, trace_ptr=good[0]), dict(TRACE=True, trace_ptr=good[1]))
    with pytest.raises(ValueError, match="for down: needs 3072 contiguous int64 values, got 3071 torch.int64"):
        _trace_args((good[0], good[1][:-1]), gate_up, down)
    with pytest.raises(ValueError, match="for gate_up: needs 3072 .* got 3072 torch.int32"):
        _trace_args((good[0].int(), good[1]), gate_up, down)
    one = _Launch(kernel=None, grid=(100,), kwargs={}, split=8, one_launch=True)
    with pytest.raises(ValueError, match="runs in one launch"):
        _trace_args(good, one, down)


@needs_gpu
def test_traced_step_on_the_gpu_matches_the_untraced_one_and_stamps_in_order():
    rows_ = _module().traced_case("qwen3-30b-a3b", "int4", 128, torch.device("cuda"), ({}, {"split_k": 1}))
    assert [r["config"] for r in rows_] == ["default", "set"]
    for row in rows_:
        assert row["same_output"] and row["in order"] and row["rel_err"] < 1e-2
        gate_up_grid, down_grid = row["grids"]
        assert row["gate_up finishers"] == gate_up_grid[0] * gate_up_grid[1]  # one per (expert, row block)
        assert row["down finishers"] == down_grid[1]  # one per row block
        assert 0 < row["h"] < row["end"] < row["next"]
    assert rows_[1]["grids"][1][2] == 1  # split_k=1: one K slice of down

"""benchmarks/step_phases.py's table, from hand-made rows (the timing itself needs a GPU)."""

from tests.scripts import load_script


def _module():
    return load_script("benchmarks", "step_phases")


def test_table_has_each_phase_and_the_step_share_of_copy():
    phases = _module()
    assert phases.PHASES[-2:] == ("read", "read+read")
    row = {"model": "qwen3-30b-a3b", "format": "int4/g128", "mb": 20.0, "one_launch": False}
    row.update({p: 10.0 + i for i, p in enumerate(phases.PHASES)})
    row["step"] = 20 * 2**20 / 2000e9 * 1e6 / 0.5  # us: 20 MiB at 50% of a 2000 GB/s copy
    failed = {"model": "olmoe", "format": "int2/g64", "error": "RuntimeError: boom"}
    lines = phases.table([row, failed], copy_gbps=2000.0).splitlines()
    header = lines[1].split()
    assert header[3:3 + len(phases.PHASES)] == list(phases.PHASES)
    cells = lines[2].split()
    assert cells[:3] == ["qwen3-30b-a3b", "int4/g128", "20.0"]
    assert cells[3] == f"{row['step']:.1f}"
    assert cells[3 + phases.PHASES.index("read+read")] == f"{row['read+read']:.1f}"
    assert cells[-1] == "50%"
    assert lines[3] == "olmoe           int2/g64  failed: RuntimeError: boom"

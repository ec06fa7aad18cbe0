"""A figure of a ``dymoe bench`` report: TTFT, TPOT and hit rate per preset (matplotlib, optional).

matplotlib is the ``plot`` extra (``pip install dymoe[plot]``); nothing else in dymoe imports it.
"""

from __future__ import annotations

from pathlib import Path

from dymoe.errors import InputError


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'dymoe[plot]' (or pip install matplotlib)") from None
    return plt


def plot_report(report: dict, path: Path) -> Path:
    """Three bar panels side by side (TTFT at the longest prompt, median TPOT, decode hit rate), one bar
    per (preset, budget) row, titled with the model and device; written to ``path``."""
    plt = require_matplotlib()
    rows = report["rows"]
    names = [r["preset"] if r["budget"] is None else f"{r['preset']}@{r['budget']}" for r in rows]
    longest = str(max(report["prompt_lens"]))
    panels = [
        (f"TTFT, {longest}-token prompt (ms)", [r["ttft_s"][longest] * 1e3 for r in rows]),
        ("TPOT, median (ms)", [r["tpot_median_s"] * 1e3 for r in rows]),
        ("decode hit rate (%)", [100 * r.get("hit_rate", 1.0) for r in rows]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.35 * len(rows) + 1.8), sharey=True)
    for ax, (title, values) in zip(axes, panels):
        ax.barh(range(len(rows)), values, color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    axes[0].invert_yaxis()
    env = report["environment"]
    fig.suptitle(f"{report['model']['name']} on {env['gpu'] or env['device']} ({env['date'][:10]})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

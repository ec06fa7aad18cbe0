"""Replay a routing trace through the runtime's cache, without a model or a device.

:func:`simulate` drives the same :class:`~dymoe.runtime.cache.ExpertCache` and eviction policies as
:class:`~dymoe.runtime.offload.OffloadedExperts`, over a :class:`~dymoe.runtime.slot_pool.SlotPool`
on the ``meta`` device (no memory), with the same per-layer step: a decode token at bf16 takes its
top-k in router order in one wave; otherwise the layer's experts (sorted, as ``group_by_expert``
yields them) run resident ones first, in waves that fit the pool. So for one trace, policy and
budget, the simulated hits, misses, evictions and bytes equal a live run's exactly (a test holds
this). What the model does not decide (the link) is a parameter: the modelled time per output token
is ``max(compute_s_per_token, missed bytes of that token / link bandwidth)``, the physical floor
of DESIGN.md, and :func:`simulate` with ``policy="belady"`` gives the oracle hit rate for the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dymoe.bench.trace import Trace
from dymoe.errors import BudgetError, InputError
from dymoe.runtime.cache import BeladyPolicy, ExpertCache
from dymoe.runtime.metrics import LayerCounters, RuntimeMetrics
from dymoe.runtime.presets import PRESETS
from dymoe.runtime.slot_pool import SlotPool, format_size


def pcie_bytes_per_s(gt_per_s: float, lanes: int) -> float:
    """Theoretical PCIe payload rate: transfers/s x lanes x 128b/130b encoding (gen 3 and later)."""
    return gt_per_s * 1e9 * lanes * 128 / 130 / 8


# Pinned host-to-device copies measured on the lent H100 machine (PCIe gen5 x16, DESIGN.md); other
# PCIe links keep the same share of their theoretical rate. NVMe: a fast gen4 SSD's sequential read.
MEASURED_PCIE5_X16 = 55e9
PCIE_EFFICIENCY = MEASURED_PCIE5_X16 / pcie_bytes_per_s(32, 16)
LINKS: dict[str, float] = {
    "pcie3x8": PCIE_EFFICIENCY * pcie_bytes_per_s(8, 8),
    "pcie3x16": PCIE_EFFICIENCY * pcie_bytes_per_s(8, 16),
    "pcie4x8": PCIE_EFFICIENCY * pcie_bytes_per_s(16, 8),
    "pcie4x16": PCIE_EFFICIENCY * pcie_bytes_per_s(16, 16),
    "pcie5x16": MEASURED_PCIE5_X16,
    "nvme": 7e9,
}
POLICIES = (*PRESETS, "belady")


def link_bandwidth(link: str | float) -> float:
    """Bytes per second of a named link (see :data:`LINKS`) or a number given directly."""
    if isinstance(link, (int, float)):
        return float(link)
    if link not in LINKS:
        raise InputError(f"--link {link} is unknown; choose one of {', '.join(LINKS)}")
    return LINKS[link]


@dataclass
class SimResult:
    """What one replay did: the runtime's counters plus the bytes each decode token missed."""

    policy: str
    precision: str
    budget_bytes: int
    expert_bytes: int
    slots: int
    metrics: RuntimeMetrics
    decode_missed_bytes: list[int] = field(default_factory=list)  # one entry per decode token
    prefill_missed_bytes: int = 0
    compute_s_per_token: float = 0.0

    @property
    def total(self) -> LayerCounters:
        return self.metrics.total()

    @property
    def hit_rate(self) -> float:
        return self.total.hit_rate

    def tpot_s(self, link: str | float = "pcie4x16") -> float:
        """Modelled time per output token: the mean over decode tokens of
        max(compute time, that token's missed bytes / link bandwidth)."""
        bandwidth = link_bandwidth(link)
        if not self.decode_missed_bytes:
            return 0.0
        return sum(max(self.compute_s_per_token, b / bandwidth) for b in self.decode_missed_bytes) / len(
            self.decode_missed_bytes)

    def prefill_io_s(self, link: str | float = "pcie4x16") -> float:
        """Seconds the link needs for every prefill miss of the trace (all prompts together)."""
        return self.prefill_missed_bytes / link_bandwidth(link)


class _Replay:
    """The per-layer step of OffloadedExperts over a cache of (layer, expert) keys, without data."""

    def __init__(self, cache: ExpertCache, metrics: RuntimeMetrics, precision: str, expert_bytes: int,
                 keep_across_layers: bool, resident_first: bool):
        self.cache, self.metrics = cache, metrics
        self.precision, self.expert_bytes = precision, expert_bytes
        self.keep_across_layers, self.resident_first = keep_across_layers, resident_first

    def layer_step(self, layer: int, experts: list[int], one_token: bool) -> None:
        if one_token:  # OffloadedExperts._decode_one (every precision since the fused low-bit kernels)
            wave = self._start_wave(layer, experts)
            if len(wave) < len(experts):
                raise BudgetError(f"layer {layer}: fewer free expert slots than one token's top-k")
            self._unpin(layer, wave)
        else:  # OffloadedExperts._schedule
            self._waves(layer, experts)
        if not self.keep_across_layers:
            self.cache.drop_layer(layer)

    def _waves(self, layer: int, experts: list[int]) -> None:
        pending = sorted(experts)  # group_by_expert's order
        if self.resident_first:
            pending.sort(key=lambda e: (layer, e) not in self.cache)
        while pending:
            wave = self._start_wave(layer, pending)
            if not wave:
                raise BudgetError(f"no free expert slot for layer {layer}")
            self._unpin(layer, wave)
            pending = pending[len(wave):]

    def _start_wave(self, layer: int, experts: list[int]) -> list[int]:
        wave = []
        for e in experts:
            key = (layer, e)
            if self.cache.lookup(key) is not None:
                self.cache.pin(key)
                self.metrics.hit(layer)
            else:
                slot = self.cache.make_room(self.precision, incoming=key)
                if slot is None:
                    break
                self.cache.insert(key, self.precision, slot)
                self.cache.pin(key)
                self.metrics.transfer(layer, self.expert_bytes)
                self.metrics.miss(layer, self.expert_bytes)
            wave.append(e)
        return wave

    def _unpin(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self.cache.unpin((layer, e))


def layer_experts(trace: Trace, layer_index: int, start: int, n: int) -> list[int]:
    """The experts one layer step needs, in the order the runtime takes them: a single token's in
    router order (the decode path), several tokens' sorted and deduplicated (``group_by_expert``)."""
    ids = trace.ids[layer_index, start:start + n]
    return ids[0].tolist() if n == 1 else sorted(set(ids.flatten().tolist()))


def _uses(trace: Trace, precision: str) -> list[tuple[int, int]]:
    """Every (layer, expert) use in the order a replay without resident-first reordering makes it."""
    keys = []
    for _, start, n in trace.steps():
        for i, layer in enumerate(trace.layers):
            experts = layer_experts(trace, i, start, n)
            if n > 1 or precision != "bf16":  # the grouped path (see _Replay._waves)
                experts = sorted(experts)
            keys += [(layer, e) for e in experts]
    return keys


def simulate(trace: Trace, policy: str, budget_bytes: int, expert_bytes: int | None = None,
             compute_s_per_token: float = 0.0) -> SimResult:
    """Replay ``trace`` under ``policy`` (a preset of :data:`~dymoe.runtime.presets.PRESETS`, or
    ``belady``, the offline optimum at bf16) with ``budget_bytes`` of expert slots.

    ``expert_bytes`` (one expert blob at the policy's precision) defaults to the trace header's
    figure. Belady replays each layer's experts in sorted order rather than resident first (it must
    know the order of uses in advance); within one layer step this changes no hit unless the pool
    is smaller than the step's distinct experts.
    """
    if policy not in POLICIES:
        raise InputError(f"--policy {policy} is unknown for the simulator; choose one of {', '.join(POLICIES)}")
    knobs = dict(PRESETS.get(policy, PRESETS["lru"]))
    precision = knobs["precision"]
    expert_bytes = expert_bytes or int(trace.header["expert_bytes"][precision])
    slots = budget_bytes // expert_bytes
    if slots < trace.top_k:
        raise BudgetError(f"--device-memory leaves room for {slots} {precision} experts, but one token needs "
                          f"{trace.top_k}: give at least {format_size(trace.top_k * expert_bytes)} for experts")
    metrics = RuntimeMetrics()
    eviction = BeladyPolicy(_uses(trace, precision)) if policy == "belady" else knobs["eviction"]
    pool = SlotPool("meta", {precision: expert_bytes}, {precision: slots})
    cache = ExpertCache(pool, eviction, on_evict=metrics.evicted)
    replay = _Replay(cache, metrics, precision, expert_bytes, knobs.get("keep_across_layers", True),
                     resident_first=policy != "belady")
    result = SimResult(policy, precision, budget_bytes, expert_bytes, slots, metrics,
                       compute_s_per_token=compute_s_per_token)
    for position, start, n in trace.steps():
        before = metrics.total().missed_bytes
        for i, layer in enumerate(trace.layers):
            replay.layer_step(layer, layer_experts(trace, i, start, n), one_token=n == 1)
            metrics.tokens_seen(layer, n)
        missed = metrics.total().missed_bytes - before
        if position > 0:
            result.decode_missed_bytes += [missed // n] * n
        else:
            result.prefill_missed_bytes += missed
    return result


# -- the report the CLI prints ---------------------------------------------------------------------

def format_report(trace: Trace, results: list[SimResult], links: list[str]) -> str:
    """A short table: hit rates and bytes per policy, then the modelled TPOT per link."""
    total_experts = len(trace.layers) * trace.num_experts
    r0 = results[0]
    lines = [
        f"trace    {trace.describe()}",
        f"routing  {trace.routing}",
        f"budget   {_mib(r0.budget_bytes):.2f} MiB: {r0.slots} {r0.precision} experts of {total_experts} "
        f"({100 * r0.slots / total_experts:.1f}%), {r0.expert_bytes / 1024:.0f} KiB each; "
        f"compute {1e3 * r0.compute_s_per_token:.2f} ms/token",
        "",
        f"{'policy':<12} {'slots':>6} {'hit %':>6} {'misses':>8} {'evictions':>9} {'MiB moved':>10} "
        f"{'prefill MiB':>11} {'MiB/decode tok':>14}",
    ]
    for r in results:
        t = r.total
        per_token = sum(r.decode_missed_bytes) / max(len(r.decode_missed_bytes), 1)
        lines.append(f"{r.policy:<12} {r.slots:>6} {100 * t.hit_rate:>6.1f} {t.misses:>8} {t.evictions:>9} "
                     f"{_mib(t.missed_bytes):>10.2f} {_mib(r.prefill_missed_bytes):>11.2f} {_mib(per_token):>14.3f}")
    lines += ["", "modelled TPOT in ms = mean over decode tokens of max(compute, missed bytes / bandwidth)",
              f"{'link':<12} {'GB/s':>6} " + " ".join(f"{r.policy:>12}" for r in results)]
    for link in links:
        lines.append(f"{link:<12} {link_bandwidth(link) / 1e9:>6.1f} "
                     + " ".join(f"{1e3 * r.tpot_s(link):>12.3f}" for r in results))
    recall = trace.predictor_recall(1)
    if recall:
        lines += ["", "cross-layer predictor recall (router of l+1 on l's gate input): "
                  + "  ".join(f"L{l} {100 * v:.1f}%" for l, v in recall.items())]
    return "\n".join(lines)


def _mib(n: float) -> float:
    return n / 2**20

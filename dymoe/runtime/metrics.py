"""RuntimeMetrics: the one place the expert runtime counts what it did, per MoE layer and in total.

Hardware-independent figures (hits, misses, bytes moved, evictions) sit next to seconds (stalls), so
results carry to other links through a transfer-time model (DESIGN.md, "Measuring"). The runtime
parts record into one object handed to them; nothing here reads a clock or synchronises a device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # hits on a copy a prefetch brought in (a subset of hits)
    prefetches: int = 0  # copies fetched ahead of use (prefetch precision = prefetch_hits / prefetches)
    missed_bytes: int = 0  # bytes of experts fetched on demand (what a perfect prefetcher would hide)
    h2d_bytes: int = 0  # all bytes moved to the device, demand and prefetch
    stall_seconds: float = 0.0  # time the compute stream waited for a transfer
    evictions: int = 0
    tokens: int = 0

    def add(self, other: "LayerCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def hit_rate(self) -> float:
        uses = self.hits + self.misses
        return self.hits / uses if uses else 0.0


class RuntimeMetrics:
    """Counters per MoE layer; :meth:`total` sums them (tokens: the most any layer saw)."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerCounters] = {}

    def layer(self, layer: int) -> LayerCounters:
        counters = self.layers.get(layer)
        if counters is None:
            counters = self.layers[layer] = LayerCounters()
        return counters

    # -- recording ------------------------------------------------------------------------------

    def hit(self, layer: int, *, prefetched: bool = False) -> None:
        counters = self.layer(layer)
        counters.hits += 1
        counters.prefetch_hits += prefetched

    def hits(self, layer: int, n: int, prefetched: int = 0) -> None:
        """``n`` hits at once, ``prefetched`` of them on prefetched copies."""
        counters = self.layer(layer)
        counters.hits += n
        counters.prefetch_hits += prefetched

    def miss(self, layer: int, nbytes: int = 0) -> None:
        """A needed expert was not resident; ``nbytes`` is what its demand fetch moves."""
        counters = self.layer(layer)
        counters.misses += 1
        counters.missed_bytes += nbytes

    def prefetch(self, layer: int) -> None:
        self.layer(layer).prefetches += 1

    def transfer(self, layer: int, nbytes: int) -> None:
        self.layer(layer).h2d_bytes += nbytes

    def stall(self, layer: int, seconds: float) -> None:
        self.layer(layer).stall_seconds += seconds

    def evicted(self, key: tuple[int, int]) -> None:
        """An expert ``(layer, expert)`` left the device (the shape of ``ExpertCache``'s ``on_evict``)."""
        self.layer(key[0]).evictions += 1

    def tokens_seen(self, layer: int, n: int) -> None:
        self.layer(layer).tokens += n

    def reset(self) -> None:
        self.layers.clear()

    # -- reporting ------------------------------------------------------------------------------

    def total(self) -> LayerCounters:
        total = LayerCounters()
        for counters in self.layers.values():
            total.add(counters)
        total.tokens = max((c.tokens for c in self.layers.values()), default=0)
        return total

    def to_dict(self) -> dict:
        """JSON-able: ``{"total": {...}, "layers": {"0": {...}, ...}}`` with hit rates included."""
        def row(c: LayerCounters) -> dict:
            return {**asdict(c), "hit_rate": c.hit_rate}

        return {"total": row(self.total()), "layers": {str(l): row(c) for l, c in sorted(self.layers.items())}}

    def format_table(self, per_layer: bool = True) -> str:
        """A short table for ``dymoe generate --stats``: one row per layer, then the total."""
        header = f"{'layer':>6} {'hits':>8} {'misses':>8} {'pf-hits':>8} {'hit %':>6} {'H2D MiB':>9} {'stall ms':>9} {'evict':>7}"
        rows = [header]
        if per_layer:
            rows += [_row(str(l), c) for l, c in sorted(self.layers.items())]
        total = self.total()
        rows.append(_row("total", total))
        if total.tokens:
            rows.append(
                f"{total.tokens} tokens: {total.h2d_bytes / total.tokens / 2**20:.2f} MiB H2D and "
                f"{total.stall_seconds / total.tokens * 1e3:.2f} ms stall per token"
            )
        return "\n".join(rows)


def _row(name: str, c: LayerCounters) -> str:
    return (f"{name:>6} {c.hits:>8} {c.misses:>8} {c.prefetch_hits:>8} {100 * c.hit_rate:>6.1f} "
            f"{c.h2d_bytes / 2**20:>9.2f} {c.stall_seconds * 1e3:>9.2f} {c.evictions:>7}")

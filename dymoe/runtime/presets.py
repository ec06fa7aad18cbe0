"""Policy presets: named configurations of the expert runtime, so every baseline runs through the
same code (DESIGN.md's preset table).

==============  =====================================  ===========  ==========================
preset          cache                                  precision    kept across layers
==============  =====================================  ===========  ==========================
resident        every expert on the device             checkpoint   yes (no offloading at all)
on-demand       none: load, run, drop                  bf16         no
lru             least recently used                    bf16         yes
lfu             least frequently used                  bf16         yes
static-int4     least recently used                    int4         yes
static-int2     least recently used                    int2         yes
lru-prefetch    lru + Fate's cross-layer gate prefetch bf16         yes
on-demand-      load, run, drop; next layer prefetched bf16         no
prefetch
arc             adaptive replacement (recency+frequency) bf16         yes
shallow         per-layer shares, shallow layers more  bf16         yes
least-stale     furthest next use by layer order,      bf16         yes
                then least recently used by pass
least-stale-    least-stale                            int4         yes
int4
fate            shallow shares + ARC per layer         int4; in     yes
                + cross-layer gate prefetch at int4    prefill,
                (slot classes: 3/4 int4, 1/4 int2)     unpopular
                                                       experts at
                                                       int2
fate-bf16       fate's cache and prefetch, at bf16     bf16         yes
dynaexq         every expert resident at int4; hottest  int4 + hot   yes
                (EMA) promoted to bf16 asynchronously   at bf16
dymoe           lru, two slot classes (bf16, int4)     per token:   yes
                + look-ahead prefetch at int4          important
                                                       experts bf16,
                                                       others int4;
                                                       first/last
                                                       layer bf16
auto (default)  resident when it fits, else lru        bf16         yes
==============  =====================================  ===========  ==========================

``auto`` stays exact (resident, else lru): the presets that beat lru on speed (static-int4, fate,
dymoe, dynaexq) change the output slightly, so they are the user's choice; the suite in
docs/benchmarks.md shows the trade per preset.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dymoe.checkpoint.blob import expert_blob_bytes
from dymoe.checkpoint.convert import convert_store
from dymoe.checkpoint.memory_store import MemoryStore
from dymoe.checkpoint.store import ExpertStore, default_store_dir
from dymoe.errors import InputError, StoreError
from dymoe.quant.formats import PRECISIONS
from dymoe.runtime.cache import POLICIES as EVICTION_POLICIES
from dymoe.runtime.hotness import HotnessConfig, HotnessExperts
from dymoe.runtime.offload import OffloadConfig, OffloadedExperts

PRESETS: dict[str, dict] = {
    "on-demand": dict(precision="bf16", eviction="lru", keep_across_layers=False),
    "lru": dict(precision="bf16", eviction="lru"),
    "lfu": dict(precision="bf16", eviction="lfu"),
    "static-int4": dict(precision="int4", eviction="lru"),
    "static-int2": dict(precision="int2", eviction="lru"),
    "lru-prefetch": dict(precision="bf16", eviction="lru", prefetch_depth=1),
    "on-demand-prefetch": dict(precision="bf16", eviction="lru", keep_across_layers=False, prefetch_depth=1),
    "arc": dict(precision="bf16", eviction="arc"),
    "shallow": dict(precision="bf16", eviction="shallow"),
    # SpecMD-style least-stale eviction (dymoe/runtime/policies.py): no thrashing when a pass needs
    # more experts than there are slots
    "least-stale": dict(precision="bf16", eviction="least-stale"),
    "least-stale-int4": dict(precision="int4", eviction="least-stale"),
    # Fate: shallow-favouring per-layer budget with ARC inside each layer, the cross-layer gate
    # prefetch, experts cached and moved at int4; in prefill the unpopular ones (fewer tokens than
    # half a balanced router's share) move at int2. Decode runs int4 only: an int2 copy left by prefill is
    # refetched, not substituted (decode errors compound into every later token). The int2 class
    # only serves prefill, so it gets a quarter of the budget.
    "fate": dict(precision="int4", low_precision="int2", precision_rule="popularity", popularity_floor=0.5,
                 high_share=0.75, substitute=False, eviction="fate", prefetch_depth=1),
    # Fate's cache and prefetch at bf16 (exact: offloading is invisible, invariant 2)
    "fate-bf16": dict(precision="bf16", eviction="fate", prefetch_depth=1),
    # DyMoE: per token, the experts holding half the router weight run at bf16, the rest at int4; the
    # first and last MoE layers are critical (bf16 only); look-ahead prefetch of the next layer at int4
    "dymoe": dict(precision="bf16", low_precision="int4", high_share=0.5, important_mass=0.5,
                  critical_layers=(0, -1), eviction="lru", prefetch_depth=1),
}
# DynaExq: every expert resident at int4, hot experts promoted to bf16 copies (dymoe/runtime/hotness.py)
HOTNESS_PRESETS: dict[str, dict] = {"dynaexq": dict(high="bf16", low="int4")}
POLICY_NAMES = ("auto", "resident", *PRESETS, *HOTNESS_PRESETS)


@dataclass(frozen=True)
class RuntimeConfig:
    """What the user asked of the expert runtime (the CLI maps its flags onto this)."""

    policy: str = "auto"
    device_memory: int | None = None  # bytes of device memory for expert slots
    device_share: float | None = None  # or a share of the routed experts' bf16 bytes (--device-memory 25%)
    host_memory: int | None = None  # bytes of pinned host RAM for the store (CUDA only)
    store: Path | None = None  # default: next to the checkpoint (see default_store_dir)
    group_size: int = 128
    progress: bool = True
    schedule: Path | None = None  # a `dymoe calibrate` schedule: critical layers of mixed-precision presets
    policy_config: Path | None = None  # a TOML or JSON file of knobs overriding the preset's (load_knobs)

    def __post_init__(self):
        if self.policy not in POLICY_NAMES:
            raise InputError(f"--policy {self.policy} is unknown; choose one of {', '.join(POLICY_NAMES)}")
        if self.device_memory is not None and self.device_share is not None:
            raise ValueError("give device_memory or device_share, not both")

    def device_budget(self, checkpoint) -> int | None:
        """Bytes of device memory for expert slots: ``device_memory``, or ``device_share`` of the
        checkpoint's routed experts at bf16 (:func:`share_budget`); None for no limit."""
        if self.device_share is not None:
            return share_budget(checkpoint.config, self.device_share)
        return self.device_memory


def share_budget(config, share: float) -> int:
    """``share`` of a model's routed experts as bf16 blobs, in whole experts (what ``--device-memory
    25%`` means everywhere: ``dymoe bench`` and ``simulate`` too)."""
    experts = int(share * len(config.moe_layers) * config.num_experts)
    return experts * expert_blob_bytes(config, "bf16")


def expert_bytes_at_rest(checkpoint, dtype: torch.dtype) -> int:
    c = checkpoint.config
    return len(c.moe_layers) * c.num_experts * c.expert_params * torch.tensor([], dtype=dtype).element_size()


def choose_preset(config: RuntimeConfig, checkpoint, dtype: torch.dtype) -> str:
    if config.policy != "auto":
        return config.policy
    if config.device_share is not None:  # a share of the experts: resident when it is all of them
        return "resident" if config.device_share >= 1 else "lru"
    if config.device_memory is None or config.device_memory >= expert_bytes_at_rest(checkpoint, dtype):
        return "resident"
    return "lru"


def open_store(checkpoint, config: RuntimeConfig, precisions: tuple[str, ...]):
    """The expert store holding ``precisions``: opened, or built (or completed) on first use with a
    clear message."""
    path = config.store or default_store_dir(checkpoint.path)
    try:
        store = ExpertStore.open(path, checkpoint)
        if all(p in store.precisions for p in precisions):
            return store
    except StoreError:
        if config.store is not None and (Path(config.store) / "index.json").exists():
            raise
    print(f"dymoe: building the expert store for {', '.join(precisions)} at {path} (one-time; later runs "
          f"reuse it)", file=sys.stderr)
    convert_store(checkpoint, path, precisions=precisions, group_size=config.group_size, progress=config.progress)
    return ExpertStore.open(path, checkpoint)


def pinned_host_tier(store, config: RuntimeConfig, precisions: tuple[str, ...], device: torch.device):
    """On CUDA, pin as much of the store as ``--host-memory`` allows (default: the precisions in use,
    up to half of the available RAM; low-bit copies first, they serve the most experts per byte)
    so copies run asynchronously at link speed."""
    if device.type != "cuda":
        return store
    wanted = sum(store.nbytes(p) for p in precisions)
    budget = config.host_memory if config.host_memory is not None else min(wanted, _available_ram() // 2)
    if budget <= 0:
        return store
    order = [(l, e, p) for p in reversed(precisions) for l in store.layers for e in range(store.num_experts)]
    return MemoryStore.pin_from(store, budget, order)


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def preset_precisions(preset: str, knobs: dict | None = None) -> tuple[str, ...]:
    """The store precisions an offloading preset reads (with ``knobs`` applied), highest first."""
    knobs = knobs or {}
    if preset in HOTNESS_PRESETS:
        hot = {**HOTNESS_PRESETS[preset], **knobs}
        return (hot["high"], hot["low"])
    return OffloadConfig(budget_bytes=0, **{**PRESETS[preset], **knobs}).precisions


_KNOB_CHOICES = {"precision": PRECISIONS, "low_precision": PRECISIONS, "high": PRECISIONS, "low": PRECISIONS,
                 "eviction": tuple(EVICTION_POLICIES), "precision_rule": ("importance", "popularity")}


def load_knobs(path: Path, preset: str) -> dict:
    """The knobs of a ``--policy-config`` file (TOML, or JSON by its suffix) for ``preset``: a flat
    table whose keys are fields of the preset's runtime config (``OffloadConfig``: prefetch_depth,
    eviction, precision, low_precision, high_share, important_mass, critical_layers, substitute,
    popularity_floor, ...; ``HotnessConfig`` for dynaexq: high, low, decay, interval). Unknown keys
    and values of the wrong type are refused with the file, the key and the accepted keys."""
    import json
    import tomllib

    path = Path(path)
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as exc:
        raise InputError(f"--policy-config {path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"--policy-config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"--policy-config {path}: expected a table of knobs, got {type(raw).__name__}")
    schema = HotnessConfig if preset in HOTNESS_PRESETS else OffloadConfig
    fields = {f.name: f for f in dataclasses.fields(schema) if f.name != "budget_bytes"}
    knobs = {}
    for key, value in raw.items():
        if key not in fields:
            raise InputError(f"--policy-config {path}: {key!r} is not a knob of --policy {preset}; "
                             f"choose from {', '.join(sorted(fields))}")
        default = fields[key].default
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        expected = (int, float) if isinstance(default, float) else type(default)
        if default is not None and (not isinstance(value, expected) or isinstance(value, bool) != isinstance(default, bool)):
            raise InputError(f"--policy-config {path}: {key} = {value!r} should be of type {type(default).__name__} "
                             f"(like the default {default!r})")
        choices = _KNOB_CHOICES.get(key)
        if choices is not None and value not in choices and not (value is None and key == "low_precision"):
            raise InputError(f"--policy-config {path}: {key} = {value!r}: choose from {', '.join(choices)}")
        knobs[key] = value
    try:
        preset_precisions(preset, knobs)
        if preset not in HOTNESS_PRESETS:
            OffloadConfig(budget_bytes=0, **{**PRESETS[preset], **knobs})
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"--policy-config {path}: {exc}") from None
    return knobs


def preset_provider(store, preset: str, budget_bytes: int, top_k: int, device, dtype: torch.dtype, **knobs):
    """The expert provider of an offloading preset over ``store`` (an :class:`ExpertStore`, its
    pinned host tier, or a :class:`MemoryStore`), with ``knobs`` overriding the preset's: the one
    place a preset name becomes a runtime (``dymoe generate``, ``dymoe bench``, the benchmarks)."""
    if preset in HOTNESS_PRESETS:
        hot = HotnessConfig(budget_bytes=budget_bytes, **{**HOTNESS_PRESETS[preset], **knobs})
        return HotnessExperts(store, hot, top_k, device, dtype)
    offload = OffloadConfig(budget_bytes=budget_bytes, **{**PRESETS[preset], **knobs})
    return OffloadedExperts(store, offload, top_k, device, dtype)


def build_offloaded(checkpoint, config: RuntimeConfig, preset: str, device: torch.device, dtype: torch.dtype):
    """The expert provider of an offloading preset, with its store, host tier and pool."""
    budget = config.device_budget(checkpoint)
    if budget is None:
        raise InputError(f"--policy {preset} offloads experts: give --device-memory (e.g. 8GiB, or 25% of the experts)")
    knobs = {}
    if config.schedule is not None:
        if "low_precision" not in PRESETS.get(preset, {}):
            raise InputError(f"--schedule sets mixed-precision depth floors; --policy {preset} has one precision")
        from dymoe.runtime.calibrate import Schedule

        knobs["critical_layers"] = Schedule.load(config.schedule).critical_layers
    if config.policy_config is not None:
        knobs.update(load_knobs(config.policy_config, preset))
    precisions = preset_precisions(preset, knobs)
    store = open_store(checkpoint, config, precisions)
    source = pinned_host_tier(store, config, precisions, device)
    return preset_provider(source, preset, budget, checkpoint.config.num_experts_per_tok, device, dtype,
                           **knobs)

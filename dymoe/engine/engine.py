"""Engine: one model, one expert runtime, one KV cache; prefill then decode, streaming token ids.

The control flow is the one of gpt-fast: :meth:`Engine.prefill` runs the prompt, :meth:`Engine.decode_one`
runs one token, :meth:`Engine.generate` strings them together and samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from dymoe.checkpoint.reader import Checkpoint
from dymoe.errors import InputError
from dymoe.engine.sampling import Sampler, SamplingParams
from dymoe.models.transformer import MoETransformer, load_dense
from dymoe.runtime.presets import RuntimeConfig, build_offloaded, choose_preset
from dymoe.runtime.resident import ResidentExperts

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class EngineConfig:
    """How to load a model: where, on which device, in which dtype, with how much context."""

    model_dir: Path
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 on GPU, float32 on CPU) | "bfloat16" | "float16" | "float32"
    context_len: int | None = None  # default: min(max_position_embeddings, 4096)
    progress: bool = True
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cuda_graphs: bool = True  # decode replays CUDA graphs on a GPU (dymoe/models/decode_graphs.py)
    warm_up: bool = True  # on a GPU, a throwaway token at load (Engine.warm_up)


@dataclass
class GenerationStats:
    """Timings of the last generation: TTFT is prompt-in to first-token-out, TPOT per later token."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tpot_s(self) -> float:
        return self.decode_s / max(self.generated_tokens - 1, 1)

    @property
    def tokens_per_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok, generated {self.generated_tokens} tok, "
            f"TTFT {self.ttft_s * 1000:.1f} ms, TPOT {self.tpot_s * 1000:.1f} ms, {self.tokens_per_s:.1f} tok/s"
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
               "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if dtype not in choices:
        raise InputError(f"--dtype {dtype} is not one of auto, bfloat16, float16, float32")
    return choices[dtype]


class Engine:
    def __init__(self, model: MoETransformer, checkpoint: Checkpoint, eos_token_ids: tuple[int, ...] = ()):
        self.model = model
        self.checkpoint = checkpoint
        self.config = model.config
        self.device = model.lm_head.weight.device
        self.eos_token_ids = eos_token_ids or model.config.eos_token_ids
        self.cache = model.new_cache(batch=1)
        self.stats = GenerationStats()
        self.preset = "resident"

    @classmethod
    def load(
        cls, config: EngineConfig, experts=None, eos_token_ids: tuple[int, ...] = (), checkpoint: Checkpoint | None = None
    ) -> "Engine":
        """Load dense weights and the expert runtime ``config.runtime`` asks for (unless ``experts``
        is given): every expert resident, or an offloading preset over the expert store."""
        checkpoint = checkpoint or Checkpoint.open(config.model_dir)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        context = config.context_len or min(checkpoint.config.max_position_embeddings, DEFAULT_CONTEXT)
        preset = choose_preset(config.runtime, checkpoint, dtype) if experts is None else "custom"
        if preset not in ("resident", "custom"):
            experts = build_offloaded(checkpoint, config.runtime, preset, device, dtype)
        with _load_progress(checkpoint, config.progress) as progress:
            model = load_dense(checkpoint, context, device, dtype, progress)
            if experts is None:
                experts = ResidentExperts.from_checkpoint(checkpoint, device, dtype, progress)
        model.attach_experts(experts)
        model.cuda_graphs = config.cuda_graphs
        engine = cls(model, checkpoint, eos_token_ids)
        engine.preset = preset
        if config.warm_up and device.type == "cuda":
            engine.warm_up(config.progress)
        return engine

    def warm_up(self, progress: bool = False) -> None:
        """Run a throwaway 2-token prompt (1 in a 2-entry context) and one decode step, so that the
        first request does not pay for what a process does once: Triton's compiles (seconds each on
        an empty cache, on a user's first run), cuBLAS's set-up, and recording the first span's
        decode graphs. The next prompt overwrites the KV cache entries it wrote, and the runtime
        forgets it (``forget_warm_up``: its counts, what it cached, dynaexq's hotness), so the text
        that follows is the one a run without the warm-up gives."""
        token = self.config.bos_token_id or 0
        n = min(2, self.model.context_len - 1)  # the decode step's position must lie in the context
        with _warm_up_progress(progress) as bar:
            logits = self.prefill(torch.full((n,), token, dtype=torch.long, device=self.device))
            bar.update(1)
            self.decode_one(logits.argmax().view(1), n)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            bar.update(1)
        forget = getattr(self.model.experts, "forget_warm_up", None)
        if forget is not None:
            forget()

    def runtime_report(self) -> str:
        """Human-readable statistics of the expert runtime (hits, bytes moved, stalls)."""
        report = getattr(self.model.experts, "report", None)
        head = f"policy: {self.preset}"
        return f"{head}\n{report()}" if report else f"{head} (all experts of {len(self.config.moe_layers)} MoE layers on the device)"

    # ---- the loop ---------------------------------------------------------------------------

    def check_prompt(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise InputError("the prompt is empty: give some text")
        if n_prompt >= self.model.context_len:
            raise InputError(
                f"the prompt has {n_prompt} tokens but the context holds {self.model.context_len}: "
                f"shorten the prompt or raise --context-len (the model allows up to "
                f"{self.config.max_position_embeddings})"
            )

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt [T] token ids -> logits [V] of the last position."""
        return self.model(prompt.view(1, -1), 0, self.cache, last_only=True)[0]

    def decode_one(self, token: torch.Tensor, position: int) -> torch.Tensor:
        return self.model.decode(token, position, self.cache)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield generated token ids one by one; timings land in ``self.stats``."""
        self.check_prompt(len(prompt_ids))
        budget = min(params.max_new_tokens, self.model.context_len - len(prompt_ids))
        sampler = Sampler(params, self.device)
        n = len(prompt_ids)
        history = torch.empty(n + budget, dtype=torch.long, device=self.device)  # allocated once
        history[:n] = torch.tensor(prompt_ids, dtype=torch.long)
        self.stats = stats = GenerationStats(prompt_tokens=n, stop_reason="length")
        started = time.perf_counter()
        logits = self.prefill(history[:n])
        for step in range(budget):
            token = sampler.sample(logits, history[: n + step])
            history[n + step] = token
            token_id = int(token)
            now = time.perf_counter()
            if step == 0:
                stats.ttft_s = now - started
                decode_started = now
            else:
                stats.decode_s = now - decode_started
            stats.generated_tokens = step + 1
            if token_id in self.eos_token_ids:
                stats.stop_reason = "eos"
                return
            yield token_id
            if step + 1 < budget:
                logits = self.decode_one(token, len(prompt_ids) + step)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _warm_up_progress(enabled: bool):
    """A bar for the warm-up that shows only when it is slow (compiling into an empty cache)."""
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=2, desc="warming up (compiling GPU kernels, recording decode graphs)", leave=False,
                delay=0.5, bar_format="{desc}: {n}/{total} {elapsed}")


def _load_progress(checkpoint: Checkpoint, enabled: bool):
    """A byte-counting progress bar for loading (tqdm), or a no-op one."""
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in checkpoint.files)
    return tqdm(total=total, unit="B", unit_scale=True, desc="loading", leave=False, delay=0.5)

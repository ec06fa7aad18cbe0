"""Train dymoe's demo model: a small Qwen3-MoE on the Python documentation, written as a Hugging Face folder.

    python tools/prepare_demo_corpus.py --out .corpus          # needs Debian's python3.11-doc
    python tools/train_demo_model.py --corpus .corpus --out models/dymoe-demo-moe --device cuda --minutes 7
    python tools/train_demo_model.py --corpus .corpus --out /tmp/tiny --device cpu --tiny   # a CPU check

Steps: train a byte-level BPE tokenizer on the training split; train the model (plain PyTorch below,
bf16 autocast on GPU, AdamW, warm-up then cosine learning rate, Switch/Qwen load-balancing loss); keep
the weights with the best validation loss; write config.json, model.safetensors (bf16, the exact tensor
names of Hugging Face's Qwen3MoeForCausalLM, one tensor per expert as the hub checkpoints have them),
tokenizer files, generation_config.json; then measure, on the shipped bf16 weights, held-out perplexity
and the routing statistics that say whether it behaves like a trained MoE; finally load the folder with
dymoe's ordinary loader (CPU, float32) to record the values the regression test checks (greedy text of a
fixed prompt, perplexity of tests/data/heldout_snippet.txt) and write README.md and training_report.json.

Training stops at the first of: the wall-clock budget (``--minutes``, counted from the first step), or
``max_epochs`` passes over the training split. The corpus is small (about 2.6 M tokens), so on an H100
the epoch cap, not the clock, usually ends the run; the best-validation weights are the ones shipped.

The experts are trained "dense-dispatched": every token goes through every expert's matmuls and the
outputs of the experts it did not choose are multiplied by a zero routing weight. That is exactly the
top-k MoE function (and gradient), costs num_experts/top_k times the expert FLOPs, and in exchange has no
per-expert Python loop, no host synchronisation and only large matmuls: the right trade for a model this
small on a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dymoe.bench.random_checkpoint import CHATML, train_tokenizer  # noqa: E402
from dymoe.checkpoint.writer import save_checkpoint, write_atomic  # noqa: E402

DOC_SEPARATOR = "<|endoftext|>"
GREEDY_PROMPT = "The Python interpreter"
GREEDY_TOKENS = 40
SNIPPET = Path(__file__).resolve().parent.parent / "tests" / "data" / "heldout_snippet.txt"


@dataclass(frozen=True)
class ModelShape:
    """The architecture (everything config.json says)."""

    vocab_size: int = 5632
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 32
    top_k: int = 4
    moe_width: int = 64
    context: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6


@dataclass(frozen=True)
class TrainSettings:
    minutes: float = 7.0
    batch: int = 16
    seq_len: int = 2048
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    aux_loss_coef: float = 0.01
    dropout: float = 0.1
    max_epochs: float = 30.0
    evals: int = 30  # validation passes spread over the run; the best one is shipped
    corpus_chars: int = 0  # 0 = the whole training split
    seed: int = 0


FULL = (ModelShape(), TrainSettings())
TINY = (
    ModelShape(vocab_size=1024, hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=32,
               num_experts=8, top_k=2, moe_width=32, context=256),
    TrainSettings(minutes=1.5, batch=8, seq_len=128, lr=3e-3, warmup_steps=20, max_epochs=4.0, evals=6,
                  corpus_chars=1_500_000),
)


# ---- the model (Hugging Face Qwen3-MoE parameter names) -------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_tables(shape: ModelShape, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim)
    freqs = torch.outer(torch.arange(shape.context, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=False)
        self.q_norm = RMSNorm(s.head_dim, s.rms_eps)
        self.k_norm = RMSNorm(s.head_dim, s.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s, (b, t, _) = self.s, x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, s.num_heads, s.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, s.num_kv_heads, s.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos[:t], sin[:t]), apply_rope(k, cos[:t], sin[:t])
        q, k = q.to(v.dtype), k.to(v.dtype)  # the norms' float32 weights promote; keep SDPA on its bf16 kernels
        groups = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


@dataclass
class Routing:
    """What one MoE layer decided, for the auxiliary loss and the statistics."""

    gate_input: torch.Tensor  # [N, H]
    probs: torch.Tensor  # [N, E] float32 softmax
    ids: torch.Tensor  # [N, k]


class SparseMoE(nn.Module):
    """Router (``mlp.gate``) plus routed experts stacked as [E, 2I, H] (gate rows, then up rows) and [E, H, I]."""

    def __init__(self, s: ModelShape):
        super().__init__()
        self.s = s
        self.gate = nn.Linear(s.hidden_size, s.num_experts, bias=False)
        self.experts_gate_up = nn.Parameter(torch.empty(s.num_experts, 2 * s.moe_width, s.hidden_size))
        self.experts_down = nn.Parameter(torch.empty(s.num_experts, s.hidden_size, s.moe_width))

    def route(self, x: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """x [N, H] -> routing and the dense routing weights [N, E] (zero for unchosen experts)."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, self.s.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)  # norm_topk_prob
        return Routing(x, probs, ids), torch.zeros_like(probs).scatter(1, ids, weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        s, shape = self.s, x.shape
        flat = x.reshape(-1, s.hidden_size)
        routing, dense_weights = self.route(flat)
        n, e, i = flat.shape[0], s.num_experts, s.moe_width
        gate_up = F.linear(flat, self.experts_gate_up.reshape(e * 2 * i, s.hidden_size)).view(n, e, 2 * i)
        gate, up = gate_up.split(i, dim=-1)
        h = F.silu(gate) * up * dense_weights.unsqueeze(-1).to(gate.dtype)
        down = self.experts_down.permute(1, 0, 2).reshape(s.hidden_size, e * i)
        return F.linear(h.reshape(n, e * i), down).view(shape), routing


def load_balancing_loss(routing: Routing, num_experts: int) -> torch.Tensor:
    """Switch Transformer / Qwen: E * sum_i f_i * P_i, f_i the share of top-k slots given to expert i,
    P_i its mean router probability; 1.0 when perfectly balanced."""
    counts = F.one_hot(routing.ids, num_experts).sum(dim=(0, 1)).float()
    return num_experts * (counts / counts.sum() * routing.probs.mean(0)).sum()


class DecoderLayer(nn.Module):
    def __init__(self, s: ModelShape, dropout: float):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_eps)
        self.mlp = SparseMoE(s)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cos, sin):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin))
        out, routing = self.mlp(self.post_attention_layernorm(x))
        return x + self.dropout(out), routing


class Backbone(nn.Module):
    def __init__(self, s: ModelShape, dropout: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s, dropout) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_eps)


class DemoMoE(nn.Module):
    """Qwen3-MoE with tied input/output embeddings (the checkpoint has no lm_head.weight)."""

    def __init__(self, s: ModelShape, dropout: float = 0.0):
        super().__init__()
        self.s = s
        self.model = Backbone(s, dropout)
        cos, sin = rope_tables(s, "cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        residual_std = std / math.sqrt(2 * self.s.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "experts_down")):
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[Routing]]:
        """tokens [B, T] -> logits [B, T, V] and each layer's routing."""
        x = self.model.embed_tokens(tokens)
        routings = []
        for layer in self.model.layers:
            x, routing = layer(x, self.cos, self.sin)
            routings.append(routing)
        return F.linear(self.model.norm(x), self.model.embed_tokens.weight), routings


# ---- checkpoint export ----------------------------------------------------------------------------


def hf_tensors(model: DemoMoE) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face Qwen3-MoE names, bf16, one tensor per expert."""
    s, out = model.s, {}
    for name, p in model.state_dict().items():
        p = p.detach().to("cpu", torch.bfloat16)
        if name.endswith("mlp.experts_gate_up"):
            prefix = name[: -len("experts_gate_up")]
            for e in range(s.num_experts):
                out[f"{prefix}experts.{e}.gate_proj.weight"] = p[e, : s.moe_width].clone()
                out[f"{prefix}experts.{e}.up_proj.weight"] = p[e, s.moe_width :].clone()
        elif name.endswith("mlp.experts_down"):
            prefix = name[: -len("experts_down")]
            for e in range(s.num_experts):
                out[f"{prefix}experts.{e}.down_proj.weight"] = p[e].clone()
        else:
            out[name] = p.clone()
    return out


def hf_config(s: ModelShape, tokenizer) -> dict:
    eos = tokenizer.token_to_id("<|endoftext|>")
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size, "intermediate_size": 4 * s.hidden_size, "moe_intermediate_size": s.moe_width,
        "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim, "num_experts": s.num_experts,
        "num_experts_per_tok": s.top_k, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": s.context, "rms_norm_eps": s.rms_eps, "rope_theta": s.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": s.rope_theta}, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
        "tie_word_embeddings": True, "initializer_range": 0.02, "output_router_logits": False,
        "bos_token_id": None, "eos_token_id": eos, "pad_token_id": eos, "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def write_folder(out: Path, model: DemoMoE, tokenizer) -> Path:
    """Write the Hugging Face folder (weights, config, tokenizer, generation config)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    write_atomic(out / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHATML,
        "model_max_length": model.s.context,
    }, indent=2) + "\n")
    eos = [tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")]
    write_atomic(out / "generation_config.json", json.dumps({"eos_token_id": eos, "do_sample": False}) + "\n")
    return save_checkpoint(out, hf_config(model.s, tokenizer), hf_tensors(model))


# ---- data --------------------------------------------------------------------------------------


def read_split(corpus: Path, split: str, max_chars: int = 0) -> list[str]:
    path = corpus / f"{split}.txt"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run tools/prepare_demo_corpus.py --out {corpus} first")
    docs = path.read_text(encoding="utf-8").split(f"\n{DOC_SEPARATOR}\n")
    if max_chars:
        kept, total = [], 0
        for doc in docs:
            if total >= max_chars:
                break
            kept.append(doc)
            total += len(doc)
        docs = kept
    return docs


def encode_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    """One token stream, documents separated by <|endoftext|>."""
    eot = tokenizer.token_to_id(DOC_SEPARATOR)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int32)


def random_batch(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator, device) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=generator)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long().to(device, non_blocking=True)


def windows(stream: torch.Tensor, seq_len: int, batch: int):
    """Non-overlapping windows [b, seq_len + 1] covering the stream (the tail shorter than a window is dropped)."""
    n = (stream.numel() - 1) // seq_len
    rows = torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).long()
    yield from rows.split(batch)


# ---- training --------------------------------------------------------------------------------------


def lr_at(step: int, total: int, t: TrainSettings) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: DemoMoE, t: TrainSettings, device) -> torch.optim.AdamW:
    """Weight decay on matrices and experts, not on norms (embeddings are matrices and decay too)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=(device.type == "cuda"))


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_step(model, batch, optimizer, t: TrainSettings, device) -> tuple[float, float]:
    with autocast(device):
        logits, routings = model(batch[:, :-1])
        lm = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        aux = torch.stack([load_balancing_loss(r, model.s.num_experts) for r in routings]).mean()
        loss = lm + t.aux_loss_coef * aux
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return lm.detach(), aux.detach()


@torch.no_grad()
def mean_nll(model, stream: torch.Tensor, seq_len: int, batch: int, device, use_autocast: bool = True) -> float:
    """Mean next-token negative log-likelihood (nats) over non-overlapping windows of ``stream``."""
    model.eval()
    total, count = 0.0, 0
    for rows in windows(stream, seq_len, batch):
        rows = rows.to(device)
        with autocast(device) if use_autocast else torch.autocast(device.type, enabled=False):
            logits, _ = model(rows[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
        count += rows[:, 1:].numel()
    model.train()
    return total / count


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Schedule:
    """Warm-up + cosine over ``total`` steps, where ``total`` is fitted to the clock once the step time is known."""

    def __init__(self, t: TrainSettings, epoch_steps: int):
        self.t, self.epoch_steps = t, epoch_steps
        self.max_steps = max(t.warmup_steps + 1, int(t.max_epochs * epoch_steps))
        self.total = self.max_steps
        self.eval_every = max(1, self.total // t.evals)

    def lr(self, step: int, elapsed: float) -> float:
        """By step, or by the clock where that is further along (a machine slower than measured still anneals)."""
        by_clock = int(elapsed / (self.t.minutes * 60 * 0.92) * self.total)
        return lr_at(max(step, by_clock), self.total, self.t)

    def fit(self, step: int, elapsed: float, step_s: float) -> None:
        """Shorten the schedule if max_epochs would not end within the budget (8% kept for validation)."""
        fit = int(step + (self.t.minutes * 60 * 0.92 - elapsed) / step_s)
        self.total = max(step + 1, self.t.warmup_steps + 1, min(self.max_steps, fit))
        self.eval_every = max(1, self.total // self.t.evals)
        tokens = self.t.batch * self.t.seq_len
        print(f"  {step_s * 1000:.0f} ms/step, {tokens / step_s / 1e3:.0f}k tok/s: schedule {self.total} steps = "
              f"{self.total / self.epoch_steps:.1f} epochs (max {self.t.max_epochs} epochs = {self.max_steps} steps, "
              f"budget {self.t.minutes} min)", flush=True)


class BestWeights:
    """Validation log, and a copy of the weights with the lowest validation loss so far."""

    def __init__(self):
        self.nll, self.step, self.state, self.log = float("inf"), 0, None, []

    def update(self, model, step: int, epoch: float, elapsed: float, lr: float, lm, aux, valid: float) -> None:
        entry = {"step": step, "epoch": round(epoch, 2), "seconds": round(elapsed, 1), "lr": lr,
                 "train_nll": round(float(lm), 4), "aux": round(float(aux), 4), "valid_nll": round(valid, 4)}
        self.log.append(entry)
        mark = ""
        if valid < self.nll:
            self.nll, self.step, mark = valid, step, " *"
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(f"  step {step:5d} ep {entry['epoch']:5.2f} {elapsed:6.1f}s lr {lr:.2e} train {entry['train_nll']:.3f} "
              f"aux {entry['aux']:.3f} valid {valid:.3f} (ppl {math.exp(valid):.1f}){mark}", flush=True)


def train(model: DemoMoE, train_ids, valid_ids, t: TrainSettings, device) -> dict:
    """The time-bounded loop; returns a log and leaves the best-validation weights in ``model``."""
    epoch_steps = max(1, train_ids.numel() // (t.batch * t.seq_len))
    schedule, best = Schedule(t, epoch_steps), BestWeights()
    optimizer = make_optimizer(model, t, device)
    generator = torch.Generator().manual_seed(t.seed)
    model.train()
    started, step = time.perf_counter(), 0
    while step < schedule.total:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step, time.perf_counter() - started)
        batch = random_batch(train_ids, t.batch, t.seq_len, generator, device)
        lm, aux = train_step(model, batch, optimizer, t, device)
        step += 1
        if step in (5, 25):  # time steps 5..25: past the first calls' set-up, before the schedule matters
            _sync(device)
            if step == 5:
                rate_from = time.perf_counter()
            else:
                schedule.fit(step, time.perf_counter() - started, (time.perf_counter() - rate_from) / 20)
        elapsed = time.perf_counter() - started
        out_of_time = elapsed > t.minutes * 60
        if step % schedule.eval_every == 0 or step == schedule.total or out_of_time:
            valid = mean_nll(model, valid_ids, t.seq_len, t.batch, device)
            best.update(model, step, step / epoch_steps, elapsed, optimizer.param_groups[0]["lr"], lm, aux, valid)
        if out_of_time:
            print(f"  time budget of {t.minutes} min reached at step {step}", flush=True)
            break
    model.load_state_dict(best.state)
    return {"steps": step, "scheduled_steps": schedule.total, "epoch_steps": epoch_steps,
            "tokens_per_step": t.batch * t.seq_len, "train_seconds": round(time.perf_counter() - started, 1),
            "best_step": best.step, "best_valid_nll": round(best.nll, 4), "log": best.log}


# ---- routing statistics ----------------------------------------------------------------------------


@torch.no_grad()
def routing_statistics(model: DemoMoE, stream: torch.Tensor, seq_len: int, batch: int, device) -> dict:
    """Skew, temporal locality and cross-layer predictability of the routing on ``stream``.

    - top10_share: share of all top-k activations that go to the ceil(10%) most used experts of a layer;
    - repeat_next: P(an expert chosen for token t is chosen again for token t+1), over k slots;
    - predictor_recall[d]: Fate's cross-layer gate, recall of the true top-k of layer l+d when layer l+d's
      router is applied to layer l's gate input (the post-attention-normed hidden state of layer l).
    Uniform random routing would give 0.1-ish, k/E and k/E respectively.
    """
    s = model.s
    model.eval()
    counts = torch.zeros(s.num_layers, s.num_experts, dtype=torch.float64)
    repeat, pairs = torch.zeros(s.num_layers), 0
    hits = {d: torch.zeros(s.num_layers - d) for d in (1, 2) if d < s.num_layers}
    tokens = 0
    for rows in windows(stream, seq_len, batch):
        _, routings = model(rows[:, :-1].to(device))
        b, t = rows.shape[0], seq_len
        for layer, r in enumerate(routings):
            counts[layer] += torch.bincount(r.ids.flatten(), minlength=s.num_experts).double().cpu()
            chosen = F.one_hot(r.ids, s.num_experts).sum(1).view(b, t, s.num_experts)
            repeat[layer] += (chosen[:, 1:] * chosen[:, :-1]).sum().item() / s.top_k
        for d, h in hits.items():
            for layer in range(s.num_layers - d):
                target = model.model.layers[layer + d].mlp.gate
                predicted = torch.topk(target(routings[layer].gate_input), s.top_k, dim=-1).indices
                truth = F.one_hot(routings[layer + d].ids, s.num_experts).sum(1)
                h[layer] += truth.gather(1, predicted).sum().item() / s.top_k
        pairs += b * (t - 1)
        tokens += b * t
    top_n = math.ceil(0.1 * s.num_experts)
    top_share = (counts.sort(dim=1, descending=True).values[:, :top_n].sum(1) / counts.sum(1)).tolist()
    model.train()
    return {
        "tokens": tokens, "top_n_experts": top_n, "uniform_top_share": top_n / s.num_experts,
        "uniform_repeat_next": s.top_k / s.num_experts,
        "top10_share": [round(x, 4) for x in top_share],
        "repeat_next": [round(x / pairs, 4) for x in repeat.tolist()],
        "predictor_recall": {f"l+{d}": [round(x / tokens, 4) for x in h.tolist()] for d, h in hits.items()},
        "expert_load": [[round(c / row.sum().item(), 4) for c in row.tolist()] for row in counts],
    }


# ---- the values the regression test checks (through dymoe itself) ---------------------------------------


def dymoe_records(folder: Path, snippet: Path) -> dict:
    """Load ``folder`` with dymoe's ordinary loader on CPU in float32; greedy text and snippet perplexity."""
    from dymoe.checkpoint.reader import Checkpoint
    from dymoe.engine.engine import Engine, EngineConfig
    from dymoe.engine.sampling import SamplingParams
    from dymoe.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(folder)
    engine = Engine.load(EngineConfig(model_dir=folder, device="cpu", dtype="float32", progress=False),
                         eos_token_ids=tokenizer.eos_token_ids, checkpoint=Checkpoint.open(folder))
    ids = list(engine.generate(tokenizer.encode(GREEDY_PROMPT), SamplingParams(max_new_tokens=GREEDY_TOKENS)))
    snippet_ids = tokenizer.encode(snippet.read_text(encoding="utf-8"))
    return {
        "greedy": {"prompt": GREEDY_PROMPT, "max_new_tokens": GREEDY_TOKENS, "token_ids": ids,
                   "text": tokenizer.decode(ids)},
        "snippet": {"file": "tests/data/heldout_snippet.txt", "tokens": len(snippet_ids),
                    "sha256": hashlib.sha256(snippet.read_bytes()).hexdigest(),
                    "perplexity": round(dymoe_perplexity(engine, snippet_ids), 4)},
    }


def dymoe_perplexity(engine, ids: list[int]) -> float:
    """Perplexity of ``ids`` under dymoe's model, in windows of the context length."""
    model, ctx = engine.model, engine.model.context_len
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, ctx):
        chunk = torch.tensor(ids[start : start + ctx + 1])
        if chunk.numel() < 2:
            break
        logits = model(chunk[:-1].view(1, -1), 0, model.new_cache(1))[0]
        total += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(total / count)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- model card ----------------------------------------------------------------------------------


def _row(values: list[float], pct: bool = True) -> str:
    return " | ".join(f"{100 * v:.1f}%" if pct else f"{v:.3f}" for v in values)


def model_card(report: dict) -> str:
    """README.md: what the model is, what it was trained on (and under which licence), how it measures."""
    s, t, r, stats = report["shape"], report["settings"], report["results"], report["routing"]
    layers = " | ".join(f"L{i}" for i in range(s["num_layers"]))
    sep = " | ".join("---" for _ in range(s["num_layers"] + 1))
    corpus = report["corpus"]
    return f"""---
license: apache-2.0
language: en
library_name: dymoe
pipeline_tag: text-generation
tags: [mixture-of-experts, qwen3_moe, demo]
---

# dymoe-demo-moe

A {report["params"]["total"] / 1e6:.1f} M-parameter Mixture-of-Experts language model (Qwen3-MoE architecture,
{s["num_layers"]} layers, {s["num_experts"]} experts per layer, top-{s["top_k"]}) trained for {r["train_seconds"] / 60:.1f} minutes
on the Python 3.11 documentation. It is dymoe's demo and test model: small enough to ship in the
repository ({report["files"]["model.safetensors"]["bytes"] / 1e6:.1f} MB, bf16), trained enough that its routing is skewed and local the way a
real MoE's is, which random weights are not. It completes text in the style of the Python docs; it is
not an assistant (the ChatML template in tokenizer_config.json is there so chat code paths run, but the
model never saw a conversation). Do not use it for anything but demos and tests.

It loads with dymoe's ordinary loader and with transformers' `Qwen3MoeForCausalLM` (tensor names and
layout are those of the hub's Qwen3-MoE checkpoints, one tensor per expert; the input and output
embeddings are tied, so there is no `lm_head.weight`).

## Architecture

| field | value |
| --- | --- |
| vocabulary | {s["vocab_size"]} (byte-level BPE trained with `tokenizers` on the training split) |
| hidden size | {s["hidden_size"]} |
| layers | {s["num_layers"]}, every one a routed MoE block |
| attention | {s["num_heads"]} query heads, {s["num_kv_heads"]} KV heads, head_dim {s["head_dim"]}, per-head q/k RMSNorm, RoPE theta {s["rope_theta"]:g} |
| experts | {s["num_experts"]} routed per layer, top-{s["top_k"]}, softmax router, top-k weights renormalised (`norm_topk_prob`), SwiGLU width {s["moe_width"]} |
| context | {s["context"]} tokens (the training sequence length) |
| parameters | {report["params"]["total"]:,} in all, {report["params"]["experts"]:,} in routed experts, {report["params"]["active_per_token"]:,} active per token |

The routed experts are narrow ({s["moe_width"]} wide, fine-grained like Qwen3-30B-A3B's 768 of 2048) so that
{s["num_experts"]} of them per layer fit the size target; `moe_intermediate_size` {"is" if s["moe_width"] % 64 == 0 else "is not"} a multiple of the
int4/int2 group size 64.

## Training data

Only the reStructuredText sources of the Python 3.11 documentation, as Debian's
`{corpus["package"]}` {corpus["package_version"]} installs them under `{corpus["source_dir"]}`
({corpus["files"]} files; `license.rst` and `copyright.rst`, which quote other projects' licences, are
left out). Licence: {corpus["license"]} — permissive and compatible with this repository's Apache-2.0.
`corpus_manifest.json` lists every file with its sha256 and its split. Markup is stripped by
`tools/prepare_demo_corpus.py` (prose and code examples kept). Documents are split by a hash of their
path: {corpus["split_docs"]["train"]} train, {corpus["split_docs"]["valid"]} validation (for choosing the checkpoint), {corpus["split_docs"]["heldout"]} held out (reported below,
never trained on or selected with): {report["tokens"]["train"]:,} / {report["tokens"]["valid"]:,} / {report["tokens"]["heldout"]:,} tokens.

GCIDE (Debian's `dict-gcide`, English dictionary prose) was considered and not used: it is GPL-3, and
shipping weights trained on it inside an Apache-2.0 repository would leave their licence unclear.

## Training

AdamW (betas {tuple(t["betas"])}, weight decay {t["weight_decay"]} on matrices), peak learning rate {t["lr"]}, {t["warmup_steps"]} warm-up
steps then cosine to {t["min_lr_ratio"]} x peak; batch {t["batch"]} x {t["seq_len"]} tokens; dropout {t["dropout"]} on the residual branches;
{"bf16 autocast" if report["device"] != "CPU" else "float32"}; load-balancing loss `E * sum_i f_i * P_i` (Switch Transformer; 1.0 when balanced) per layer,
averaged over layers, coefficient {t["aux_loss_coef"]}. {r["steps"]} steps ({r["steps"] / r["epoch_steps"]:.1f} epochs) in {r["train_seconds"]:.0f} s on
{report["device"]}; the weights of the best validation loss (step {r["best_step"]}) are the ones shipped.
Reproduce with

    python tools/prepare_demo_corpus.py --out .corpus
    {report["command"]}

(GPU kernels and tokenizer training threads make a retrained model close to, not bit-equal with, this one.)

## Quality

Measured on the shipped bf16 weights (float32 compute):

| split | tokens | perplexity | bits per byte |
| --- | --- | --- | --- |
| validation | {report["tokens"]["valid"]:,} | {r["valid_perplexity"]:.2f} | {r["valid_bits_per_byte"]:.3f} |
| held out | {report["tokens"]["heldout"]:,} | {r["heldout_perplexity"]:.2f} | {r["heldout_bits_per_byte"]:.3f} |
| `tests/data/heldout_snippet.txt` (dymoe, CPU, float32) | {report["snippet"]["tokens"]} | {report["snippet"]["perplexity"]:.2f} | |

Perplexity is per token of this model's tokenizer; bits per byte (nats / ln 2 x tokens / UTF-8 bytes) is
comparable across tokenizers. The snippet figure is what `tests/models/test_demo_model.py` checks
(`.venv/bin/python -m pytest tests/models/test_demo_model.py`).

Greedy completion of `{report["greedy"]["prompt"]!r}` ({report["greedy"]["max_new_tokens"]} tokens, dymoe, CPU, float32):

```text
{report["greedy"]["prompt"]}{report["greedy"]["text"]}
```

## Routing on held-out text

Over {stats["tokens"]:,} held-out tokens:

| statistic | {layers} |
| {sep} |
| share of activations on the top {stats["top_n_experts"]} of {s["num_experts"]} experts (uniform: {100 * stats["uniform_top_share"]:.1f}%) | {_row(stats["top10_share"])} |
| P(expert used at token t is used at t+1) (random: {100 * stats["uniform_repeat_next"]:.1f}%) | {_row(stats["repeat_next"])} |

Cross-layer predictor (Fate, arXiv 2502.12224): recall of layer l+d's true top-{s["top_k"]} when layer l+d's router is
applied to the gate input of layer l (the post-attention RMSNorm output); column Lx is l = x
(random guessing: {100 * stats["uniform_repeat_next"]:.1f}%).

| look-ahead | {" | ".join(f"L{i}" for i in range(s["num_layers"] - 1))} |
| {" | ".join("---" for _ in range(s["num_layers"]))} |
{chr(10).join(f"| {key} | {_row(v)}{' | -' * (s['num_layers'] - 1 - len(v))} |" for key, v in stats["predictor_recall"].items())}

Per-expert load is in `training_report.json` (`routing.expert_load`).

## Files

| file | bytes | sha256 |
| --- | --- | --- |
{chr(10).join(f"| {name} | {f['bytes']:,} | `{f['sha256']}` |" for name, f in report["files"].items())}
"""


# ---- main ----------------------------------------------------------------------------------------


def param_counts(model: DemoMoE) -> dict:
    s = model.s
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if "experts_" in n)
    return {"total": total, "experts": experts, "active_per_token": total - experts * (s.num_experts - s.top_k) // s.num_experts}


def corpus_summary(corpus: Path, docs: dict[str, list[str]]) -> dict:
    manifest = json.loads((corpus / "manifest.json").read_text())
    return {key: manifest[key] for key in ("package", "package_version", "license", "source_dir")} | {
        "files": len(manifest["files"]), "split_docs": {k: len(v) for k, v in docs.items()},
        "chars_used": {k: sum(map(len, v)) for k, v in docs.items()},
    }


def evaluate_shipped(model: DemoMoE, streams: dict, docs: dict, t: TrainSettings, device) -> tuple[DemoMoE, dict]:
    """A float32 copy of the model holding exactly the shipped bf16 weights, and its perplexities."""
    shipped = DemoMoE(model.s).to(device)
    shipped.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    results = {}
    for split in ("valid", "heldout"):
        nll = mean_nll(shipped, streams[split], t.seq_len, t.batch, device, use_autocast=False)
        n_bytes = sum(len(d.encode()) for d in docs[split])
        results[f"{split}_nll"] = round(nll, 4)
        results[f"{split}_perplexity"] = round(math.exp(nll), 3)
        results[f"{split}_bits_per_byte"] = round(nll / math.log(2) * streams[split].numel() / n_bytes, 4)
    return shipped, results


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path(".corpus"), help="output of tools/prepare_demo_corpus.py")
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=None, help="training time budget (default 7; --tiny 1.5)")
    parser.add_argument("--max-epochs", type=float, default=None, help="cap on passes over the training split")
    parser.add_argument("--tiny", action="store_true", help="a small model on part of the corpus (a CPU check)")
    parser.add_argument("--snippet", type=Path, default=SNIPPET, help="held-out text the regression test measures")
    parser.add_argument("--rerecord", action="store_true",
                        help="do not train: recompute, with dymoe on this machine's CPU, the greedy text and snippet "
                             "perplexity of the model in --out and rewrite its training_report.json and README.md")
    return parser.parse_args(argv)


def rerecord(folder: Path, snippet: Path) -> int:
    """Re-measure the values the regression test checks (after a change of snippet, or on another CPU/torch)."""
    report = json.loads((folder / "training_report.json").read_text())
    report.update(dymoe_records(folder, snippet))
    report["recorded_with"] = {"torch": torch.__version__, "device": "CPU"}
    write_atomic(folder / "training_report.json", json.dumps(report, indent=1) + "\n")
    write_atomic(folder / "README.md", model_card(report))
    print(f"snippet perplexity {report['snippet']['perplexity']:.3f}; greedy {report['greedy']['text']!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rerecord:
        return rerecord(args.out, args.snippet)
    shape, settings = TINY if args.tiny else FULL
    settings = replace(settings, minutes=args.minutes or settings.minutes,
                       max_epochs=args.max_epochs or settings.max_epochs)
    device = torch.device(args.device)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()

    eval_chars = settings.corpus_chars // 8
    docs = {"train": read_split(args.corpus, "train", settings.corpus_chars),
            "valid": read_split(args.corpus, "valid", eval_chars),
            "heldout": read_split(args.corpus, "heldout", eval_chars)}
    tokenizer = train_tokenizer(docs["train"], shape.vocab_size)
    shape = replace(shape, vocab_size=tokenizer.get_vocab_size())
    streams = {split: encode_docs(tokenizer, d) for split, d in docs.items()}
    print(f"tokenizer: {shape.vocab_size} tokens; " + ", ".join(f"{k} {v.numel():,} tokens" for k, v in streams.items())
          + f" ({time.perf_counter() - started:.0f}s)", flush=True)

    model = DemoMoE(shape, settings.dropout).to(device)
    params = param_counts(model)
    print(f"model: {params['total']:,} parameters ({params['experts']:,} in experts, {params['active_per_token']:,} "
          f"active per token) on {device}; training for at most {settings.minutes} min", flush=True)
    log = train(model, streams["train"], streams["valid"], settings, device)

    write_folder(args.out, model, tokenizer)
    (args.out / "model.safetensors").chmod(0o644)
    shipped, results = evaluate_shipped(model, streams, docs, settings, device)
    print(f"held-out perplexity {results['heldout_perplexity']:.2f} "
          f"({results['heldout_bits_per_byte']:.3f} bits/byte), "
          f"validation {results['valid_perplexity']:.2f}", flush=True)
    stats = routing_statistics(shipped, streams["heldout"], settings.seq_len, settings.batch, device)
    print(f"routing: top-{stats['top_n_experts']} share {stats['top10_share']}, repeat {stats['repeat_next']}, "
          f"predictor recall {stats['predictor_recall']}", flush=True)
    records = dymoe_records(args.out, args.snippet)
    print(f"dymoe (CPU float32): snippet perplexity {records['snippet']['perplexity']:.2f}; greedy "
          f"{GREEDY_PROMPT!r} -> {records['greedy']['text']!r}", flush=True)

    (args.out / "corpus_manifest.json").write_bytes((args.corpus / "manifest.json").read_bytes())
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(args.out.iterdir())
             if p.name not in ("README.md", "training_report.json") and p.is_file()}
    report = {
        "command": "python tools/train_demo_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": asdict(shape), "settings": asdict(settings), "params": params, "device": device_name(device),
        "torch": torch.__version__, "corpus": corpus_summary(args.corpus, docs),
        "tokens": {k: v.numel() for k, v in streams.items()},
        "results": results | {k: v for k, v in log.items() if k != "log"}, "routing": stats, **records,
        "recorded_with": {"torch": torch.__version__, "device": "CPU"},
        "files": files, "sha256": files["model.safetensors"]["sha256"], "log": log["log"],
    }
    write_atomic(args.out / "training_report.json", json.dumps(report, indent=1) + "\n")
    write_atomic(args.out / "README.md", model_card(report))
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB; model.safetensors sha256 {report['sha256']}) "
          f"in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


if __name__ == "__main__":
    raise SystemExit(main())

"""A Llama-family decoder (Llama, Qwen2, Mistral) over flattened token batches.

Input is one flat list of tokens from many sequences (prompt chunks and single-token
decodes mixed, no padding) with their positions; attention reaches each sequence's earlier
tokens through the paged KV cache (see engine.attention). Arithmetic follows transformers'
modeling_llama op for op (RMSNorm in float32, RoPE tables from position * inv_freq,
residual adds in the same order), so float32 greedy output matches transformers token for token.

q/k/v and gate/up are each one fused matmul; `load_weights` maps HF tensor names onto them. On a
float32 CPU model the linears then run on oneDNN-packed weights (`pack_linears`), whose sums run in
another order: the logits differ from transformers' in the last bits; the greedy tokens matched on
every oracle test and benchmark prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.padding import padded_rows


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # transformers' op order without its two casts (no-ops here, each a dispatch)
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    params = dict(cfg.rope_scaling)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif cfg.rope_type == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_len, computed once. The sin table is stored
    with its first half negated, so that rotate_half(x) * sin, transformers' cat(-x2, x1) * sin,
    is cat(x2, x1) * signed_sin: the same products exactly (a sign moves between factors), one op
    fewer."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        freqs = torch.arange(max_len).float()[:, None] * rope_inv_freq(cfg)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("signed_sin", torch.cat((-freqs.sin(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin at each token's position, [T, 1, head_dim]: gathered once per step, used by every layer."""
        return self.cos[positions].to(dtype)[:, None, :], self.signed_sin[positions].to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin, for the heads of x [T, heads, head_dim]."""
    cos, signed_sin = cos_sin
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.backend = backend

    def forward(self, x, cos_sin, kv_cache, meta: AttentionMetadata, residual):
        """residual + the attention's output (the add fused into o_proj where it is packed)."""
        qkv = self.qkv_proj(x)
        heads = self.num_heads + self.num_kv_heads
        qk = apply_rotary(qkv[:, : heads * self.head_dim].view(-1, heads, self.head_dim), cos_sin)  # q and k in one pass
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, heads * self.head_dim :].view(-1, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim), add=residual)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x, residual):
        """residual + the MLP's output (the add fused into down_proj where it is packed)."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, add=residual)


class Linear(nn.Linear):
    """nn.Linear that can add a tensor to its output, as PackedLinear does in one oneDNN call."""

    def forward(self, x, add=None):
        y = super().forward(x)
        return y if add is None else add + y


class PackedLinear(nn.Module):
    """A float32 CPU linear layer whose weight oneDNN reordered once into its own blocked layout
    (as vLLM's CPU backend and torch.compile's CPU freezing do). At decode batch sizes, where each
    weight streams from memory once per step, it ran a step's matmuls 1.2-1.5x faster than MKL's
    GEMM on the plain weight with two threads, by using the second core better (on one thread the
    two tied; benchmarks/RESULTS.md). Its sums run in another order than F.linear's, so results
    differ in the last bits; greedy tokens still match transformers'.

    oneDNN keeps memory for every row count a weight shape has run (0.3-0.7 MiB each here), and
    prefill steps bring a new row count almost every step: a prefill worker's RSS grew by ~0.7 MiB
    per request without end.
    So rows are padded up to one of `padded_rows`' few sizes (benchmarks/RESULTS.md, Soak)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = bias

    def forward(self, x, add=None):
        """x's linear map, plus `add` if given: as oneDNN's binary post-op, applied to the finished
        float32 sums, so exactly add + y (a residual add then costs no pass of its own)."""
        rows = x.shape[0]
        padded = padded_rows(rows)
        if padded != rows:
            x = _pad(x, padded)
            add = None if add is None else _pad(add, padded)
        if add is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")[:rows]
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.packed, self.bias, "add")[:rows]


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos_sin, kv_cache, meta):
        h = self.self_attn(self.input_layernorm(h), cos_sin, kv_cache, meta, residual=h)
        return self.mlp(self.post_attention_layernorm(h), residual=h)


LayerHook = Callable[[int], None]  # called with a layer's index once its KV is in the cache


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend, max_len: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg, max_len)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.num_parameters = sum(p.numel() for p in self.parameters())  # the checkpoint's, before any packing
        self.pads_rows = False  # a step's rows padded to engine.padding.padded_rows (packed linears)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches, layer_hook: LayerHook | None = None):
        """Hidden states of every input token. `layer_hook(i)` runs once layer i's KV is in the
        cache (the prefill worker starts shipping that layer then)."""
        h = self.embed_tokens(input_ids)
        cos_sin = self.rotary(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos_sin, kv_caches[i], meta)
            if layer_hook is not None:
                layer_hook(i)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)
        return logits.float()

    @torch.no_grad()
    def pack_linears(self, batch_hint: int) -> None:
        """Every projection, and the LM head, as a PackedLinear (a float32 model on a CPU with
        oneDNN; elsewhere nothing changes). A tied LM head gets a packed copy of the embedding,
        which the token lookup still reads."""
        weight = self.embed_tokens.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, PackedLinear(child.weight, child.bias, batch_hint))
        if self.lm_head is None:
            self.lm_head = PackedLinear(weight, None, batch_hint)
        self.pads_rows = True

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into this model; every parameter (and every shard of a fused
        one) must be set exactly once."""
        params = dict(self.named_parameters())
        shard_sizes = {"qkv_proj": self._qkv_sizes(), "gate_up_proj": [self.cfg.intermediate_size] * 2}
        pending = set()
        for name in params:
            fused = next((f for f in shard_sizes if f".{f}." in name), None)
            shards = range(len(shard_sizes[fused])) if fused else [None]
            pending.update((name, i) for i in shards)
        for name, tensor in tensors:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, shard = name.removeprefix("model."), None
            for hf, (fused, index) in _FUSED.items():
                if f".{hf}." in target:
                    target, shard = target.replace(f".{hf}.", f".{fused}."), index
            if (target, shard) not in pending:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model (or appears twice)")
            pending.discard((target, shard))
            dest = params[target]
            if shard is not None:
                sizes = shard_sizes[_FUSED[name.split(".")[-2]][0]]
                dest = dest.narrow(0, sum(sizes[:shard]), sizes[shard])
            if dest.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(dest.shape)}")
            dest.copy_(tensor)
        if pending:
            raise ValueError(f"checkpoint is missing tensors for: {', '.join(sorted(n for n, _ in pending)[:5])}")

    def _qkv_sizes(self) -> list[int]:
        cfg = self.cfg
        return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]


# HF projection name -> (our fused parameter, shard index)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}  # fmt: skip

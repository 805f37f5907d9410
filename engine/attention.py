"""Attention over the paged KV cache, behind one interface with two backends.

The ModelRunner builds one AttentionMetadata per step (not per layer). Sequences are
ordered decodes first, so rows [0, num_decodes) are single-token queries. Every layer then
calls `backend.forward(q, k, v, k_cache, v_cache, meta)`, which writes the step's new K/V into
the cache by slot mapping and attends over the cache.

- TorchAttention: kernels.reference's store; the decodes sorted by length and gathered in
  buckets (little padding), each bucket attended by one SDPA call with a padding mask (one
  bmm per KV head instead spent a third of a 64-sequence decode step in torch's per-matrix
  bmm loop over strided views); each prefill chunk through SDPA. The CPU's fallback where it
  has no C compiler, and its path for half dtypes.
- CpuAttention: TorchAttention with the decodes through kernels.cpu_attention's C kernel,
  which reads the K/V in place instead of gathering them (+15% engine throughput on 64 short
  prompts, benchmarks/RESULTS.md), and the K/V stored by its copy kernel. The default on CPU
  in float32.
- TritonAttention: the kernels in kernels.triton_attention. The default on CUDA; on CPU it
  runs under the Triton interpreter (TRITON_INTERPRET=1), which is how it is tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.model_files import cache_root
from kernels import cpu_attention, reference


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, tokens in the cache after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    query_start_list: list[int]  # host copies, for per-sequence loops
    seq_lens_list: list[int]
    plan: object = field(default=None)  # backend-specific per-step data, from backend.prepare


class TorchAttention:
    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5
        self.block_size = block_size

    def prepare(self, meta: AttentionMetadata) -> None:
        """Sort and bucket the decode rows by length once per step; every layer reuses it."""
        if meta.num_decodes:
            meta.plan = _DecodePlan(meta.block_tables, meta.seq_lens_list[: meta.num_decodes], self.block_size)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        self._store(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            out[:n] = self._decode(q[:n], k_cache, v_cache, meta)
        starts, lens = meta.query_start_list, meta.seq_lens_list
        for b in range(n, len(lens)):
            out[starts[b] : starts[b + 1]] = self._prefill(q[starts[b] : starts[b + 1]], k_cache, v_cache, meta, b)
        return out

    def _store(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        reference.store_kv(k, v, k_cache, v_cache, slot_mapping)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata):
        """q: the decode rows [B, H, D]. Taken in plan order, each bucket is gathered into
        [n, L, Hkv, D] and attended by one SDPA call over strided [n, Hkv, L, D] views (never
        copied again), the query heads of a KV head side by side as [n, Hkv, group, D]."""
        plan = meta.plan
        batch, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        q = q[plan.order].view(batch, num_kv_heads, self.group, head_dim)
        out = torch.empty_like(q)
        for start, end, block_ids, pad_bias in plan.buckets:
            n = end - start
            k = torch.index_select(k_cache, 0, block_ids).view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
            v = torch.index_select(v_cache, 0, block_ids).view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
            out[start:end] = F.scaled_dot_product_attention(q[start:end], k, v, attn_mask=pad_bias.to(q.dtype), scale=self.scale)
        unsorted = torch.empty_like(out)
        unsorted[plan.order] = out
        return unsorted.view(batch, num_heads, head_dim)

    def _prefill(self, q, k_cache, v_cache, meta, b):
        seq_len = meta.seq_lens_list[b]
        q_len = q.shape[0]
        kk = reference.gather_kv(k_cache, meta.block_tables[b], seq_len)
        vv = reference.gather_kv(v_cache, meta.block_tables[b], seq_len)
        # SDPA wants [1, heads, tokens, dim] (on the CPU only 4-D inputs take the fused flash kernel;
        # 3-D ones fall back to the unfused math path, 2x slower); the causal mask is offset by the
        # cached context.
        qt, kt, vt = q.transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None]
        if q_len == seq_len:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1)


_DECODE_BUCKET = 8  # decode rows per gather: fewer means less padding but more small ops


class _DecodePlan:
    """The decode rows sorted by length (`order`) and cut into buckets of _DECODE_BUCKET rows.
    Each bucket is padded to its own longest row: (start, end) in sorted order, the blocks to
    gather, and an additive mask (0 real, -inf padding) of shape [n, 1, 1, padded length]."""

    def __init__(self, block_tables: torch.Tensor, seq_lens: list[int], block_size: int):
        device = block_tables.device
        order = sorted(range(len(seq_lens)), key=seq_lens.__getitem__)
        self.order = torch.tensor(order, device=device)
        self.buckets = []
        for start in range(0, len(order), _DECODE_BUCKET):
            rows = order[start : start + _DECODE_BUCKET]
            lens = torch.tensor([seq_lens[r] for r in rows], device=device)
            num_blocks = -(-int(lens.max()) // block_size)
            block_ids = block_tables[torch.tensor(rows, device=device), :num_blocks].reshape(-1).long()
            positions = torch.arange(num_blocks * block_size, device=device)
            pad_bias = torch.zeros(len(rows), 1, 1, len(positions), device=device)
            pad_bias.masked_fill_(positions >= lens[:, None, None, None], float("-inf"))
            self.buckets.append((start, start + len(rows), block_ids, pad_bias))


class CpuAttention(TorchAttention):
    """TorchAttention with the decodes through the C kernel of kernels.cpu_attention, which reads
    each sequence's K/V where they lie in the pool instead of gathering a copy (float32 on the
    CPU, at a head_dim the kernel supports: EngineConfig.resolve allows it nowhere else). Built on
    first use into the cache root."""

    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
        super().__init__(num_heads, num_kv_heads, head_dim, block_size)
        self.library = cpu_attention.load(cache_root() / "kernels")

    def prepare(self, meta: AttentionMetadata) -> None:
        """Nothing to precompute: the kernel reads the block tables and lengths directly."""

    def _store(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        cpu_attention.store_kv(self.library, k, v, k_cache, v_cache, slot_mapping)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata):
        n = meta.num_decodes
        return cpu_attention.decode_attention(self.library, q, k_cache, v_cache, meta.block_tables[:n], meta.seq_lens[:n], self.scale)


class TritonAttention:
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
        from kernels import triton_attention  # imported only when chosen: triton is optional on CPU

        self.kernels = triton_attention
        self.scale = head_dim**-0.5

    def prepare(self, meta: AttentionMetadata) -> None:
        """Nothing to precompute: the kernels read the block tables and lengths directly."""

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        self.kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.max_query_len == 1:
            return self.kernels.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale)
        return self.kernels.prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len, self.scale
        )


def make_attention_backend(name: str, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
    backends = {"torch": TorchAttention, "cpu": CpuAttention, "triton": TritonAttention}
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(backends)}")
    return backends[name](num_heads, num_kv_heads, head_dim, block_size)

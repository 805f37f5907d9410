"""Pure-torch paged attention.

Shapes, shared with the Triton kernels:
    query        [T, H, D]            new tokens of B sequences, flattened (no padding)
    key, value   [T, Hkv, D]          their keys/values, H = group * Hkv (GQA)
    k/v_cache    [N, block_size, Hkv, D]
    slot_mapping [T]                  block_id * block_size + offset of each new token
    block_tables [B, max_blocks]      int32; entries past a sequence's length are ignored
    seq_lens     [B]                  tokens in the cache after this step (context + new)
    query_start_loc [B + 1]           cumulative query lengths; sequence b owns rows
                                      query_start_loc[b]:query_start_loc[b+1]
A query at absolute position p (its sequence's context length plus its index in the chunk)
attends to the keys at positions 0..p of its own sequence.
"""

from __future__ import annotations

import torch


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


def gather_kv(cache, block_table, length: int):
    """The first `length` cached tokens of one sequence, contiguous: [length, Hkv, D]."""
    num_blocks = -(-length // cache.shape[1])
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale: float):
    """The obviously-correct version: one sequence at a time, explicit mask and softmax."""
    out = torch.empty_like(query)
    group = query.shape[1] // k_cache.shape[2]
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q = query[starts[b] : starts[b + 1]].float()
        context = seq_len - q.shape[0]
        k = gather_kv(k_cache, block_tables[b], seq_len).float().repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, block_tables[b], seq_len).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = context + torch.arange(q.shape[0], device=q.device)[:, None]
        scores.masked_fill_(torch.arange(seq_len, device=q.device)[None, :] > q_pos, float("-inf"))
        out[starts[b] : starts[b + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(query.dtype)
    return out

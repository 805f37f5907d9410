"""Triton kernels for paged attention. Shapes as in kernels.reference.

One attention kernel serves decodes and prefill chunks; the two wrappers pick its tiling.
A program owns one sequence, one tile of its query tokens and one KV head. Its query tile
packs BLOCK_Q tokens x GROUP query heads (the heads sharing that KV head) into BLOCK_M rows,
so GQA loads each key/value once for the whole group:

    row r  ->  token  q_tile * BLOCK_Q + r // GROUP,   head  kv_head * GROUP + r % GROUP

It walks the sequence's keys BLOCK_N at a time through its block table (a gather per key:
block tables may be in any order) with an online softmax, masking causally by absolute
position. Decode: BLOCK_Q = 1 token of GROUP heads, padded to 16 rows. Prefill: 64 rows.

Wrappers check shapes and strides and never copy their inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    key_stride, value_stride,
    ELEMS: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < ELEMS
    k = tl.load(key_ptr + token * key_stride + offs, mask=mask)
    v = tl.load(value_ptr + token * value_stride + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ELEMS + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * ELEMS + offs, v, mask=mask)


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    scale,
    q_stride_t, q_stride_h, o_stride_t, o_stride_h, bt_stride,
    cache_stride_block, cache_stride_slot, cache_stride_head,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    context_len = tl.load(seq_lens_ptr + seq) - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    q_pos = context_len + tok

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The last query of this tile sees keys up to kv_end - 1; key 0 is visible to every row,
    # so no row's running maximum stays at -inf after the first tile (no NaN from exp).
    kv_end = context_len + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
    for start in range(0, kv_end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < kv_end
        block_ids = tl.load(block_tables_ptr + seq * bt_stride + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
        offs = (
            block_ids.to(tl.int64) * cache_stride_block
            + (k_pos % BLOCK_SIZE) * cache_stride_slot
            + kv_head * cache_stride_head
        )
        kv_mask = k_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where((k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * o_stride_t + head[:, None] * o_stride_h + dims[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :],
    )


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    for t in (key, value):
        assert t.shape == key.shape and t.stride(2) == 1 and t.stride(1) == head_dim, "key/value rows must be dense"
    for c in (k_cache, v_cache):
        assert c.is_contiguous() and c.shape[2:] == (num_kv_heads, head_dim) and c.dtype == key.dtype
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.device == key.device
    elems = num_kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
        ELEMS=elems, BLOCK=triton.next_power_of_2(elems),
    )


def decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale: float):
    """One new token per sequence: query [B, H, D]."""
    batch = query.shape[0]
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=query.device)
    group = query.shape[1] // k_cache.shape[2]
    block_m = max(16, triton.next_power_of_2(group))
    return _launch(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, 1, scale, block_m)


def prefill_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len: int, scale: float):
    """Variable-length causal chunks over cached context: query [T, H, D]; decodes may be mixed in
    as chunks of one token."""
    group = query.shape[1] // k_cache.shape[2]
    block_m = max(64, triton.next_power_of_2(group))
    return _launch(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale, block_m)


def _launch(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale, block_m):
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    batch = seq_lens.shape[0]
    assert cache_head_dim == head_dim and num_heads % num_kv_heads == 0
    assert query.stride(2) == 1, "query rows must be dense in head_dim"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch and block_tables.stride(1) == 1
    assert query_start_loc.shape == (batch + 1,)
    assert block_size & (block_size - 1) == 0, "block size must be a power of two"
    group = num_heads // num_kv_heads
    block_q = block_m // group
    out = torch.empty_like(query)
    grid = (batch, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=64,
        # fp32 inputs: full-precision dot, not TF32, so results match the fp32 reference.
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    return out

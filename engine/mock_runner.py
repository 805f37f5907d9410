"""MockRunner: a timed stand-in for ModelRunner (`--engine mock[:PROFILE]`), for experiments that
need many workers stepping at another machine's rates. Everything around it is real: the
scheduler, block allocator, prefix cache, reservations and KV transfers.

For each scheduled batch it runs no model; it
  1. writes deterministic bytes into the KV slots the step computes, so transfers and their
     checksums carry real data: every value of token p's K (or V) in layer l is kv_values(...);
  2. waits until the step has lasted what the cost profile predicts for the batch, counted from
     the moment the scheduler began building it (scheduling is part of a step, not added on
     top), calling the layer hook at even intervals through the step, so the prefill worker
     ships each layer's KV when a real forward would have computed it;
  3. returns pseudo-tokens: the token at position p is a hash of the PSEUDO_CONTEXT tokens
     before it and p, taken from the served tokenizer's vocabulary minus its special and EOS
     ids. It depends on nothing else (not the request id, not the worker), so a request whose
     prompt is another's prompt plus its first k tokens goes on with the same tokens: a
     migrated request resumes seamlessly, and repeats hit the prefix cache as they would.

Sampling options (temperature, top-p/k, seed) are ignored: there is no distribution to sample.
`SamplingParams.mock_output_len = n` makes output token n an EOS, so a request ends where its
trace says; max_tokens, ignore_eos and stop token ids apply as usual.

A mock engine holds the PROFILED model's KV layout (layers, KV heads, head dim, dtype), so the
bytes it stores and ships are that model's; `mock_kv_fraction` < 1 keeps the layers and dtype
and narrows each layer to one head of round(heads x head_dim x fraction) values.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import ModelConfig
from engine.cost_model import CostProfile
from engine.kv_cache import KVCache
from engine.model import LayerHook
from engine.sampler import SamplerOutput
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

PSEUDO_CONTEXT = 4  # tokens before a position that choose its pseudo-token
_MASK64 = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit function of z."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def pseudo_token(previous: list[int], position: int, vocab_size: int, excluded: frozenset[int]) -> int:
    """The mock's token at `position`, after the tokens `previous` (only the last few count)."""
    h = _mix(position + 0x9E3779B97F4A7C15)
    for token in previous[-PSEUDO_CONTEXT:]:
        h = _mix(h ^ (token + 0x9E3779B97F4A7C15))
    while h % vocab_size in excluded:
        h = _mix(h + 1)
    return h % vocab_size


def kv_values(token_ids: np.ndarray, positions: np.ndarray, num_layers: int) -> torch.Tensor:
    """[num_layers, 2, T] float32: the value every element of each token's K and V holds."""
    code = (token_ids.astype(np.int64) * 7919 + positions * 31) % 1021
    per_token = torch.from_numpy(code.astype(np.float32) / 1024)
    offsets = torch.arange(num_layers * 2, dtype=torch.float32).view(num_layers, 2, 1)
    return per_token.view(1, 1, -1) + offsets


def token_space(model_dir: Path, model: ModelConfig) -> tuple[int, frozenset[int]]:
    """The vocabulary pseudo-tokens come from: its size (the tokenizer's, if smaller than the
    model's) and the ids to avoid (EOS and the tokenizer's special tokens)."""
    excluded = set(model.eos_token_ids)
    vocab = model.vocab_size
    path = model_dir / "tokenizer.json"
    if path.is_file():
        tok = json.loads(path.read_text())
        added = tok.get("added_tokens", [])
        excluded |= {t["id"] for t in added if t.get("special")}
        pieces = tok.get("model", {}).get("vocab") or {}  # BPE/WordPiece: {piece: id}; Unigram: [[piece, score], ...]
        size = max(pieces.values(), default=-1) + 1 if isinstance(pieces, dict) else len(pieces)
        size = max([size, *(t["id"] + 1 for t in added)])
        vocab = min(vocab, size) if size else vocab
    if sum(1 for t in excluded if 0 <= t < vocab) >= vocab:
        raise ValueError("the vocabulary has no ordinary token for the mock engine to emit")
    return vocab, frozenset(excluded)


def mock_kv_model(served: ModelConfig, profile: CostProfile, fraction: float) -> ModelConfig:
    """The served model's config with the profiled model's KV layout (scaled by `fraction`)."""
    heads, dim = profile.kv.num_kv_heads, profile.kv.head_dim
    if fraction < 1:
        heads, dim = 1, max(1, round(heads * dim * fraction))
    return dataclasses.replace(served, num_layers=profile.kv.num_layers, num_kv_heads=heads, head_dim=dim)


def sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


class MockRunner:
    def __init__(self, profile: CostProfile, kv_cache: KVCache, vocab_size: int, excluded: frozenset[int], eos_ids: tuple[int, ...]):
        self.profile = profile
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.num_layers = kv_cache.kv.shape[0]
        self.vocab_size = vocab_size
        self.excluded = excluded
        self.eos = eos_ids[0] if eos_ids else None
        self.late_steps = 0  # steps whose own work (KV writes, layer hooks) outlasted the prediction

    def run(self, batch: ScheduledBatch, layer_hook: LayerHook | None = None) -> SamplerOutput:
        """Tokens of the sequences that reach the end of their tokens, in batch order (no logprobs:
        a mock has no logits)."""
        self.write_kv(batch.seqs)
        self.wait(batch.started, self.step_seconds(batch.seqs), layer_hook)
        tokens = [self.next_token(s) for s in batch.seqs if s.num_computed_tokens + s.num_scheduled_tokens == len(s)]
        return SamplerOutput(tokens, [None] * len(tokens))

    def step_seconds(self, seqs: list[Sequence]) -> float:
        """What the profile predicts: prompt chunks by (tokens, context), single-token queries as
        a decode batch by their total length (as the attention backends split them)."""
        prefill = [(s.num_scheduled_tokens, s.num_computed_tokens) for s in seqs if s.num_scheduled_tokens > 1]
        decodes = [s.num_computed_tokens + 1 for s in seqs if s.num_scheduled_tokens == 1]
        return self.profile.step_seconds(prefill, len(decodes), sum(decodes))

    def write_kv(self, seqs: list[Sequence]) -> None:
        q_lens = np.array([s.num_scheduled_tokens for s in seqs], dtype=np.int64)
        computed = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(q_lens)])
        seq_index = np.repeat(np.arange(len(seqs)), q_lens)
        positions = np.arange(starts[-1]) - starts[:-1][seq_index] + computed[seq_index]
        token_ids = np.concatenate([np.asarray(s.token_ids[c : c + n], dtype=np.int64)
                                    for s, c, n in zip(seqs, computed.tolist(), q_lens.tolist())])  # fmt: skip
        tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int64)
        for i, s in enumerate(seqs):
            tables[i, : len(s.block_table)] = s.block_table
        slots = torch.from_numpy(tables[seq_index, positions // self.block_size] * self.block_size + positions % self.block_size)
        kv = self.kv_cache.kv
        flat = kv.view(kv.shape[0], 2, -1, *kv.shape[4:])  # [L, 2, slots, H, D]
        flat[:, :, slots] = kv_values(token_ids, positions, self.num_layers).to(kv.dtype)[..., None, None]

    def wait(self, started: float, seconds: float, layer_hook: LayerHook | None) -> None:
        """Until started + seconds, calling layer_hook(i) as layer i's share of the step ends."""
        layers = range(self.num_layers) if layer_hook is not None else [self.num_layers - 1]
        late = False
        for i in layers:
            until = started + seconds * (i + 1) / self.num_layers
            late |= time.perf_counter() > until
            sleep_until(until)
            if layer_hook is not None:
                layer_hook(i)
        self.late_steps += late

    def next_token(self, seq: Sequence) -> int:
        hint = seq.params.mock_output_len
        if hint is not None and seq.output_index + 1 == hint and self.eos is not None:  # counts across moves
            return self.eos
        return pseudo_token(seq.token_ids, len(seq), self.vocab_size, self.excluded)

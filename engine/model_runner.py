"""Runs one scheduled batch through the model: build the step's tensors once, forward, sample.

Step inputs, built with numpy from the sequences' block tables (no per-token Python loops):
    input_ids, positions   the scheduled tokens of every sequence, flattened
    slot_mapping           block_table[pos // block_size] * block_size + pos % block_size
    block_tables           [B, max blocks in this batch], padded with 0 (masked by seq_lens)
Logits are computed only for the last token of sequences that sample this step, and for the
prompt rows of sequences that ask for prompt logprobs (a few hundred rows at a time).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.kv_cache import KVCache
from engine.model import LayerHook, LlamaForCausalLM
from engine.outputs import TokenLogprobs
from engine.sampler import Penalties, Sampler, SamplerOutput, token_logprobs
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

PROMPT_LOGITS_ROWS = 256  # prompt rows whose logits are made at once: [rows, vocab] float32, ~50 MB at 49k


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, backend, sampler: Sampler, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.block_size = kv_cache.block_size

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, layer_hook: LayerHook | None = None) -> SamplerOutput:
        """Sampled tokens (and logprobs, where asked) of the sequences that reach the end of their
        tokens, in batch order."""
        input_ids, positions, meta, sampling = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta, self.kv_cache.layers, layer_hook)
        prompt_logprobs = self._prompt_logprobs(batch, hidden, meta.query_start_list)
        if not sampling:
            return SamplerOutput([], [], prompt_logprobs)
        last_rows = [meta.query_start_list[i + 1] - 1 for i in sampling]
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows, device=self.device)])
        seqs = [batch.seqs[i] for i in sampling]
        penalties = [_penalties(s, self.device) for s in seqs]
        out = self.sampler(logits, [s.params for s in seqs], [s.output_index for s in seqs], [s.token_ids for s in seqs], penalties)
        out.prompt_logprobs = prompt_logprobs
        return out

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor, starts: list[int]) -> dict[int, list[TokenLogprobs]]:
        """For each sequence (by index in the batch) that asks for prompt logprobs and computes
        prompt tokens this step, not yet reported: each computed row's logprobs of the prompt
        token after it (row p predicts token p + 1; the last prompt row samples instead)."""
        rows, targets, top, owners = [], [], [], []
        for i, seq in enumerate(batch.seqs):
            if not seq.prompt_logprobs_pending:
                continue  # what every sequence pays each step when it does not ask
            k, c = seq.params.prompt_logprobs, seq.num_computed_tokens
            end = min(c + seq.num_scheduled_tokens, seq.num_prompt_tokens - 1)  # the last row's target
            if end <= c:
                continue
            rows += range(starts[i], starts[i] + end - c)
            targets += seq.token_ids[c + 1 : end + 1]
            top += [k] * (end - c)
            owners.append((i, end - c))
        if not rows:
            return {}
        found: list[TokenLogprobs] = []
        for lo in range(0, len(rows), PROMPT_LOGITS_ROWS):
            part = slice(lo, lo + PROMPT_LOGITS_ROWS)
            logits = self.model.compute_logits(hidden[torch.tensor(rows[part], device=self.device)])
            found += token_logprobs(logits, torch.tensor(targets[part], device=self.device), top[part])
        out, at = {}, 0
        for i, n in owners:
            out[i], at = found[at : at + n], at + n
        return out

    def prepare(self, batch: ScheduledBatch):
        seqs = batch.seqs
        q_lens = np.array([s.num_scheduled_tokens for s in seqs], dtype=np.int64)
        computed = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
        seq_lens = computed + q_lens
        starts = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=starts[1:])
        seq_index = np.repeat(np.arange(len(seqs)), q_lens)
        positions = np.arange(starts[-1]) - starts[:-1][seq_index] + computed[seq_index]

        max_blocks = max(len(s.block_table) for s in seqs)
        block_tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
        for i, s in enumerate(seqs):
            block_tables[i, : len(s.block_table)] = s.block_table
        slots = block_tables[seq_index, positions // self.block_size].astype(np.int64) * self.block_size
        slots += positions % self.block_size

        input_ids = []
        for s, c, n in zip(seqs, computed.tolist(), q_lens.tolist()):
            input_ids += s.token_ids[c : c + n]
        sampling = [i for i, s in enumerate(seqs) if seq_lens[i] == len(s)]  # reach the end: sample
        num_decodes = int(np.argmax(q_lens != 1)) if (q_lens != 1).any() else len(seqs)

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc=torch.from_numpy(starts.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(block_tables).to(dev),
            max_query_len=int(q_lens.max()),
            num_decodes=num_decodes,
            query_start_list=starts.tolist(),
            seq_lens_list=seq_lens.tolist(),
        )
        self.backend.prepare(meta)
        return (
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.from_numpy(positions).to(dev),
            meta,
            sampling,
        )


def _penalties(seq: Sequence, device: torch.device) -> Penalties | None:
    """A penalized sequence's Penalties, made at its first step and kept with it (across preemption
    too: its history does not change)."""
    if seq.params.penalized and seq.penalties is None:
        seq.penalties = Penalties(device)
    return seq.penalties

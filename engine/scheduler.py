"""Which tokens of which sequences the next step computes, and who owns which KV block.

One step, under a budget of max_num_batched_tokens (chunked prefill, the default):
  1. running decodes, oldest first: one token each. A sequence whose next token needs a
     new block when none is free preempts the newest running sequence (its blocks are
     freed; it goes back to the front of the queue and is recomputed later).
  2. running sequences part-way through their prompt: their next chunk.
  3. waiting sequences, first come first served, while budget and blocks last (and only if
     nothing was preempted this step): the longest cached prefix is reused and only the rest
     is scheduled, chunk by chunk.
Decodes come first so a long prompt never stalls them for more than one chunk. Without
chunked prefill, waiting prompts go first and whole (the oldest even past the budget), and
decodes share what budget is left.

Block ownership, per request:
  waiting   owns nothing
  running   owns seq.block_table (shared prefix blocks by reference)
  held      prefill-only role, after the first token: still owns its blocks until release()
            (the transfer to the decode worker was acknowledged); they then become cache
  reserved  decode-only role: owns blocks allocated by reserve() until add_prefilled() turns
            them into a running sequence, or abort() frees them
Every exit (finish, abort, preemption, release) returns the blocks to the allocator.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_allocator import BlockAllocator, hash_blocks
from engine.config import EngineConfig
from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)  # single-token queries first
    started: float = field(default_factory=time.perf_counter)  # when scheduling began: the step's start

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass
class SchedulerStats:
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, found
    preemptions: int = 0
    steps: int = 0
    chunked_prefill_steps: int = 0  # steps that computed part of a prompt, not all of it
    prompt_tokens: int = 0  # prompt tokens scheduled to be computed (the autoscaler's prefill rate)
    refused_reservations: int = 0  # decode: reserve() calls answered None
    busy_seconds: float = 0.0  # time spent in steps that did work (LLMEngine.step)
    busy_cpu_seconds: float = 0.0  # the engine thread's CPU time in those steps


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: BlockAllocator, eos_token_ids: tuple[int, ...]):
        self.config = config
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.waiting_blocks = 0  # the blocks the waiting sequences' tokens fill once admitted (before prefix-cache hits)
        self.running: list[Sequence] = []
        self.held: dict[str, Sequence] = {}
        self.reserved: dict[str, list[int]] = {}
        self.requests: dict[str, Sequence] = {}  # waiting, running and held, by id
        self.stats = SchedulerStats()
        self._block_hashes: dict[str, list[int]] = {}

    # --- entering --------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self._check_new_id(seq.request_id)
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        self.waiting_blocks += self._blocks_of(seq)

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Decode role: set aside blocks for a prompt whose KV will arrive from a prefill worker.
        None (and nothing allocated) if that would leave a running sequence, or one reserved
        before (it runs once its KV lands), unable to grow: its first step would preempt a
        sequence whose KV was just transferred. Also None while preempted sequences wait to be
        recomputed, or at max_num_seqs."""
        self._check_new_id(request_id)
        n = -(-num_tokens // self.block_size)
        full = len(self.running) + len(self.reserved) >= self.config.max_num_seqs
        if self.waiting or full or self.allocator.num_free - n < len(self.running) + len(self.reserved):
            self.stats.refused_reservations += 1
            return None
        self.reserved[request_id] = blocks = self.allocator.allocate(n)
        return blocks

    def add_prefilled(self, seq: Sequence, first_token: int, first_logprobs: TokenLogprobs | None = None) -> None:
        """Decode role: the prompt's KV is in the reserved blocks; the sequence joins the running
        batch with its first output token (and its logprobs) already sampled by the prefill worker."""
        blocks = self.reserved.pop(seq.request_id, None)
        if blocks is None:
            raise KeyError(f"no reservation for request {seq.request_id!r}")
        if len(blocks) != -(-seq.num_prompt_tokens // self.block_size):
            self.allocator.free(blocks)
            raise ValueError(f"request {seq.request_id!r}: {len(blocks)} blocks reserved for {seq.num_prompt_tokens} prompt tokens")
        seq.block_table = blocks
        seq.num_computed_tokens = seq.num_prompt_tokens
        if self.config.enable_prefix_caching:  # a preempted sequence finds its transferred prompt here, not recomputes it
            full = seq.num_prompt_tokens // self.block_size
            self.allocator.cache(blocks[:full], self._hashes(seq, full), seq.token_ids)
        seq.status = SequenceStatus.RUNNING
        self.requests[seq.request_id] = seq
        self.running.append(seq)
        self._append_token(seq, first_token, first_logprobs)

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self.requests or request_id in self.reserved:
            raise ValueError(f"request id {request_id!r} is already in use")

    # --- leaving ---------------------------------------------------------------------------

    def abort(self, request_id: str) -> Sequence | None:
        blocks = self.reserved.pop(request_id, None)
        if blocks is not None:
            self.allocator.free(blocks)
            return None
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, FinishReason.ABORT)
        return seq

    def release(self, request_id: str) -> None:
        """Prefill role: the decode worker has the KV; the blocks become prefix cache."""
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self._free_blocks(seq)
            del self.requests[request_id]

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish a sequence for a reason found outside the scheduler (a stop string); it may have
        been preempted since its last token, and be waiting."""
        if not seq.is_finished:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.waiting_blocks -= self._blocks_of(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        if reason is FinishReason.PREFILLED:
            self.held[seq.request_id] = seq
            return
        self.held.pop(seq.request_id, None)
        self._free_blocks(seq)
        self.requests.pop(seq.request_id, None)

    def _free_blocks(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        self._block_hashes.pop(seq.request_id, None)

    # --- one step --------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preemptions = self.stats.preemptions
        if self.config.enable_chunked_prefill:
            budget = self._schedule_running(batch, budget)
            # After a preemption the pool is short: admitting now would only restart the victim.
            if self.stats.preemptions == preemptions:
                self._admit_waiting(batch, budget)
        else:
            # Whole prompts first (the oldest even past the budget), decodes in what is left: without
            # chunks a long prompt stalls the running decodes for as long as it takes.
            budget = self._admit_waiting(batch, budget)
            self._schedule_running(batch, budget)
        batch.seqs.sort(key=lambda s: s.num_scheduled_tokens != 1)
        if batch:
            self.stats.steps += 1
            self.stats.prompt_tokens += sum(s.num_scheduled_tokens for s in batch.seqs
                                            if s.num_computed_tokens < s.num_prompt_tokens)  # fmt: skip
            if any(s.num_computed_tokens + s.num_scheduled_tokens < s.num_prompt_tokens for s in batch.seqs):
                self.stats.chunked_prefill_steps += 1
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        """Decodes first, then the next chunks of part-computed prompts; returns the budget left."""
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1 and s not in batch.seqs]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1 and s not in batch.seqs]
        for seq in decoding + prefilling:
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self._chunk(seq, budget, batch)
            if n == 0 or not self._make_room(seq, n, batch):
                continue
            budget -= self._schedule(seq, n, batch)
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> int:
        """Start waiting sequences, first come first served; returns the budget left."""
        # Blocks that running decodes not yet scheduled this step will need: a prompt admitted
        # into them would make an older sequence be preempted for a newer one.
        headroom = sum(self._blocks_needed(s, 1) for s in self.running if s.num_uncomputed_tokens == 1 and not s.num_scheduled_tokens)
        # Reserved sequences join the batch as their KV lands: they count against max_num_seqs now.
        while self.waiting and budget > 0 and len(self.running) + len(self.reserved) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = self._admit(seq, budget, batch, headroom)
            if n == 0:
                break
            self.waiting.popleft()
            self.waiting_blocks -= self._blocks_of(seq)
            self.running.append(seq)
            budget -= self._schedule(seq, n, batch)
        return budget

    def _chunk(self, seq: Sequence, budget: int, batch: ScheduledBatch) -> int:
        """Tokens of seq to compute this step: all that remain, cut to the chunk size and budget.
        Without chunked prefill a prompt runs whole, alone if it exceeds the budget."""
        remaining = seq.num_uncomputed_tokens
        if remaining == 1:
            return 1
        if not self.config.enable_chunked_prefill:
            return remaining if remaining <= budget or not batch else 0
        return min(remaining, budget, self.config.chunk_size)

    def _schedule(self, seq: Sequence, n: int, batch: ScheduledBatch) -> int:
        seq.num_scheduled_tokens = n
        batch.seqs.append(seq)
        return n

    def _blocks_of(self, seq: Sequence) -> int:
        return -(-len(seq) // self.block_size)

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        return -(-(seq.num_computed_tokens + n) // self.block_size) - len(seq.block_table)

    def _make_room(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Allocate the blocks seq needs for n more tokens, preempting the newest running
        sequences not already in this step's batch if the pool is short. False if seq itself
        had to be preempted."""
        need = self._blocks_needed(seq, n)
        while self.allocator.num_free < need:
            victim = next(s for s in reversed(self.running) if s is seq or s not in batch.seqs)
            self._preempt(victim)
            if victim is seq:
                return False
        seq.block_table += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)
        self.waiting_blocks += self._blocks_of(seq)

    def _admit(self, seq: Sequence, budget: int, batch: ScheduledBatch, headroom: int) -> int:
        """Give a waiting sequence its cached prefix and the blocks for its first chunk, leaving
        `headroom` blocks free; returns the chunk's length, 0 if it cannot start this step."""
        cached = self._match_prefix(seq)
        seq.num_computed_tokens = len(cached) * self.block_size
        n = self._chunk(seq, budget, batch)
        newly_shared = sum(1 for b in cached if self.allocator.ref_count(b) == 0)
        need = -(-(seq.num_computed_tokens + n) // self.block_size) - len(cached)
        if n == 0 or self.allocator.num_free - newly_shared - headroom < need:
            seq.num_computed_tokens = 0
            return 0
        self.allocator.share(cached)
        seq.block_table = cached + self.allocator.allocate(need)
        seq.status = SequenceStatus.RUNNING
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
            self.stats.prefix_query_tokens += seq.num_prompt_tokens
            self.stats.prefix_hit_tokens += seq.num_computed_tokens
        return n

    def _match_prefix(self, seq: Sequence) -> list[int]:
        if not self.config.enable_prefix_caching:
            return []
        if seq.prompt_logprobs_pending:
            return []
        # At least one token must be computed to produce logits, so a fully cached sequence
        # still recomputes its last block.
        usable = (len(seq) - 1) // self.block_size
        hashes = self._hashes(seq, usable)
        return self.allocator.match_prefix(hashes[:usable], seq.token_ids)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The hash chain of seq's first num_blocks full blocks, extended incrementally."""
        hashes = self._block_hashes.setdefault(seq.request_id, [])
        if len(hashes) < num_blocks:
            parent = hashes[-1] if hashes else 0
            hashes += hash_blocks(seq.token_ids[: num_blocks * self.block_size], self.block_size, parent, len(hashes))
        return hashes

    # --- after the step --------------------------------------------------------------------

    def postprocess(self, batch: ScheduledBatch, sampled: list[int], logprobs: list[TokenLogprobs | None] | None = None,
                    prompt_logprobs: dict[int, list[TokenLogprobs]] | None = None) -> None:  # fmt: skip
        """Advance every scheduled sequence; those that reached the end of their tokens got one
        new token each, in batch order, in `sampled` (and its logprobs in `logprobs`); those that
        ask for prompt logprobs, the ones of the prompt tokens after the rows computed, by index
        in the batch in `prompt_logprobs` (a runner without logits gives none: None stands in)."""
        tokens = iter(sampled)
        token_logprobs = iter(logprobs or [None] * len(sampled))
        for i, seq in enumerate(batch.seqs):
            if seq.num_computed_tokens < seq.num_prompt_tokens and seq.prompt_logprobs_pending:
                _record_prompt_logprobs(seq, (prompt_logprobs or {}).get(i, []))
            first = seq.num_computed_tokens // self.block_size  # blocks full before the step are cached already
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            full = seq.num_computed_tokens // self.block_size
            if self.config.enable_prefix_caching and full > first:
                self.allocator.cache(seq.block_table[:full], self._hashes(seq, full), seq.token_ids, start=first)
            if seq.num_computed_tokens == len(seq):
                self._append_token(seq, next(tokens), next(token_logprobs))

    def _append_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        seq.token_ids.append(token)
        if seq.params.logprobs is not None:
            seq.logprobs.append(logprobs)
        reason = self._stop_reason(seq, token)
        if seq.prefill_only:
            self._finish(seq, FinishReason.PREFILLED)
        elif reason is not None:
            self._finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params: SamplingParams = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        if seq.output_index >= params.max_tokens or len(seq) >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    # --- invariants ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Every block reference is held by a running or held sequence or a reservation."""
        owned = sum(len(s.block_table) for s in self.running) + sum(len(s.block_table) for s in self.held.values())
        owned += sum(len(b) for b in self.reserved.values())
        assert all(not s.block_table for s in self.waiting), "a waiting sequence holds blocks"
        assert self.waiting_blocks == sum(self._blocks_of(s) for s in self.waiting), "waiting_blocks drifted"
        self.allocator.check_invariants(expected_in_use=owned)


def _record_prompt_logprobs(seq: Sequence, found: list[TokenLogprobs]) -> None:
    """A step that computed prompt tokens of seq: found[j] holds the logprobs of prompt token
    c + 1 + j (c = the tokens computed before the step). Only tokens not recorded yet are: a
    preempted sequence computes its prompt again."""
    c = seq.num_computed_tokens
    last = min(c + seq.num_scheduled_tokens, seq.num_prompt_tokens - 1)
    for target in range(len(seq.prompt_logprobs), last + 1):
        j = target - c - 1
        seq.prompt_logprobs.append(found[j] if 0 <= j < len(found) else None)

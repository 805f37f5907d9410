"""One simulated worker: an engine's scheduler and KV pool as counts, stepping on the simulated clock.

It mirrors engine/scheduler.py (chunked prefill, which the engine runs by default) step for step:
  1. running decodes, one token each; if the pool cannot hold their next tokens, the newest running
     sequence is preempted (its blocks freed; it goes to the front of the queue and is recomputed)
  2. running sequences part-way through their prompt: their next chunk (min(rest, budget, chunk))
  3. waiting sequences, first come first served, while budget, blocks and max_num_seqs last (and
     only if nothing was preempted this step), reusing the cached prefix
and as roles: prefill (prompts only; a computed prompt holds its blocks until its KV transfer is
acknowledged, then they become prefix cache), decode (reserve -> KV arrives -> decode; refuses a
reservation that would leave a running sequence no block to grow into, while preempted sequences
wait, or at max_num_seqs) and colocated (both). The step time is the profile's
step_seconds(prompt chunks, decode batch, decode context), as the mock runner times it.

Where it simplifies (and why):
  - Blocks are counts, not ids. A prefix cache entry is a shared prefix (a request's prefix_id)
    of whole blocks, evicted least recently used, and only once no plainly free block is left:
    the allocator's LRU free queue evicts a prefix that requests keep using about as late. Decode
    workers keep no prefix cache (they receive every block and never look one up).
  - Steps with nothing but decodes are aggregated: between changes of the batch (a sequence joins
    or finishes, the pool runs short) the worker advances in one event of k steps (at most 1 s). Every sequence
    grows one token per step, so the batch's context grows linearly and the span's time is the
    sum of a linear series between its first and last step's time (exact within one segment of
    the profile's grid). Blocks in use are counted exactly at any step from the sequences' length
    residues (blocks = sum ceil(len / block_size)).
  - A prompt chunk that does not fit preempts the sequence itself rather than a newer prompt.
  - Sequences joining after a KV transfer wait for the step in flight, as the engine thread runs
    commands between steps (their blocks stay reserved until then); their first token reaches the
    client as they join (the decode worker reports it then), the second with their first step.
    A reservation is decided on arrival but answered at the end of the step in flight
    (`step_boundary`): the router starts the prefill only then.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque

from router.workers import Role, WorkerRecord

MAX_SPAN = 1024  # decode steps in one event at most (keeps the linear step-time series close)
MAX_SPAN_SECONDS = 1.0  # ...and simulated seconds: the router's window and the timeline see token gaps as they happen
PROMPT, RECOMPUTE = 0, 1  # what a sequence's prompt computation is: its request's prompt, or a preempted sequence's tokens


class Seq:
    """A request's stay on one worker."""

    __slots__ = ("req", "kind", "length", "computed", "own", "shared", "prefix", "steps", "base", "finish", "done", "last_token")

    def __init__(self, req, kind: int, length: int, steps: int, prefix: int = -1):
        self.req = req
        self.kind = kind
        self.length = length  # tokens to compute as a prompt (or, decoding: tokens held)
        self.computed = 0
        self.own = 0  # KV blocks it holds alone
        self.shared = 0  # prefix-cache blocks it shares
        self.prefix = prefix  # its shared prefix's id, -1 if none
        self.steps = steps  # tokens still to produce once its prompt is computed (the first included)
        self.base = 0  # decoding: its length at decode step s is base + s
        self.finish = 0  # decoding: the decode step count at which it is done
        self.done = False
        self.last_token = 0.0  # recomputing after a preemption: when its latest token came (the gap to its next is an ITL)


class SimWorker:
    def __init__(self, worker_id: str, role: Role, spec, profile, sink, spans: list | None = None, trace_until: float = 0.0):
        """`sink` hears of token gaps (`on_itl(mid-time, seconds, count)`) and first tokens
        (`on_first_token(request, time)`); `spans`, if a list, gets the Chrome-trace spans of the
        steps that start before `trace_until`."""
        self.id, self.role, self.spec, self.profile = worker_id, role, spec, profile
        self.bs = spec.block_size
        self.total = spec.num_kv_blocks
        self.record = WorkerRecord(worker_id, role, handle=None, total_blocks=self.total, free_blocks=self.total,
                                   max_num_seqs=spec.max_num_seqs)  # fmt: skip
        self.sink, self.spans, self.trace_until = sink, spans, trace_until
        # queues
        self.waiting: deque[Seq] = deque()
        self.waiting_blocks = 0  # the blocks the waiting sequences fill once admitted (the router leaves them out of free)
        self.prefilling: list[Seq] = []
        self.running: dict[Seq, None] = {}  # decoding and prefilling, in admission order (preemption takes the newest)
        self.held = 0  # prefill role: computed prompts whose transfer is not acknowledged yet
        self.reserved = 0  # decode role: reservations whose sequence has not joined (KV not arrived, or in joins)
        self.joins: list[Seq] = []  # KV arrived during a step: they join at its end
        # KV as counts
        self.own = 0  # blocks held by single sequences and reservations (decoding sequences excluded)
        self.prefixes: OrderedDict[int, list[int]] = OrderedDict()  # prefix id -> [blocks, refs], LRU first
        self.prefix_blocks = 0
        self.evictable = 0  # prefix blocks no sequence references
        # the decode batch, aggregated: sequence i holds base_i + dstep tokens
        self.dstep = 0
        self.n_dec = 0
        self.sum_base = 0
        self.residues = [0] * self.bs  # sequences by base mod block_size
        self.sum_residues = 0
        self.dec_shared = 0
        self.finishes: list = []  # heap of (finish step, order, seq)
        self._order = 0
        # the step in flight
        self.version = 0
        self.in_flight = False
        self.started = 0.0
        self.chunks: list[tuple[Seq, int]] = []  # an explicit step's prompt chunks (empty: a decode span)
        self.span = (0, 0.0, 0.0)  # decode span: (steps, first step's seconds, slope per step)
        self.step_decodes = 0  # decodes in the step in flight
        # counters the planner reads as differences
        self.busy_seconds = 0.0
        self.prompt_tokens = 0
        self.refused = 0
        self.preemptions = 0
        self.steps = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # --- state ---------------------------------------------------------------------------------

    def is_empty(self) -> bool:
        return not (self.running or self.waiting or self.held or self.reserved or self.joins)

    def _dec_blocks(self, s: int) -> int:
        """Blocks the decode batch needs in decode step s: sum of ceil((base_i + s) / bs) over its
        sequences, from their residues base_i mod bs: (r + m) mod bs = r + m - bs [r >= bs - m]."""
        bs, n = self.bs, self.n_dec
        c = s + bs - 1
        m = c % bs
        wrapped = sum(self.residues[bs - m :]) if m else 0
        return (self.sum_base + n * c - (self.sum_residues + m * n - bs * wrapped)) // bs - self.dec_shared

    def free_blocks(self, s: int | None = None) -> int:
        """What the allocator could hand out at decode step s: free plus evictable cached blocks."""
        dec = self._dec_blocks(self.dstep if s is None else s) if self.n_dec else 0
        return self.total - self.own - self.prefix_blocks - dec + self.evictable

    def current_step(self, now: float) -> int:
        """The decode step count as of `now` (a decode span in flight advances it step by step)."""
        if not self.in_flight or self.chunks:
            return self.dstep
        k, a, slope = self.span
        return self.dstep + min(k, _steps_within(now - self.started, a, slope))

    def step_boundary(self, now: float) -> float:
        """When this worker's engine thread next runs a command (a reservation, say): at the end of
        the step in flight (of a decode span: the step the span is in), or now if idle."""
        if not self.in_flight:
            return now
        k, a, slope = self.span
        if self.chunks or k <= 1:
            return self.started + _series(k, a, slope)
        return self.started + _series(min(k, _steps_within(now - self.started, a, slope) + 1), a, slope)

    def used_blocks(self, now: float) -> int:
        """As of `now`: in a decode span, at the step in flight (a real worker reports every step)."""
        return self.total - self.free_blocks(self.current_step(now))

    def sync_record(self, now: float) -> None:
        """The router's view of this worker as of `now` (the real router's comes from its latest poll,
        every step)."""
        self.record.free_blocks = self.free_blocks(self.current_step(now)) - self.waiting_blocks
        self.record.running = len(self.running) + len(self.waiting) + self.reserved  # as a real worker's load counts them

    def _allocate(self, n: int, free_plain: int) -> None:
        """Take n blocks, evicting cached prefixes (least recently used) if plainly free ones run out."""
        while free_plain < n and self.evictable:
            for pid, entry in self.prefixes.items():
                if entry[1] == 0:
                    del self.prefixes[pid]
                    self.prefix_blocks -= entry[0]
                    self.evictable -= entry[0]
                    free_plain += entry[0]
                    break
        self.own += n

    def _unshare(self, seq: Seq) -> None:
        if seq.shared:
            entry = self.prefixes[seq.prefix]
            entry[1] -= 1
            if entry[1] == 0:
                self.evictable += entry[0]
            self.prefixes.move_to_end(seq.prefix)
            seq.shared = 0

    # --- entering and leaving ------------------------------------------------------------------

    def add_prompt(self, seq: Seq) -> None:
        """Prefill or colocated: a prompt to compute (queued until a step admits it)."""
        self.waiting.append(seq)
        self.waiting_blocks += -(-seq.length // self.bs)

    def reserve(self, tokens: int, now: float) -> bool:
        """Decode role: blocks for a prompt whose KV will arrive (the scheduler's reserve rule, on the
        pool as it is between the steps now; see span_fits)."""
        n = -(-tokens // self.bs)
        free = self.free_blocks(self.current_step(now))
        if self.waiting or len(self.running) + self.reserved >= self.spec.max_num_seqs or free - n < len(self.running) + self.reserved:
            self.refused += 1
            return False
        self._allocate(n, free - self.evictable)
        self.reserved += 1
        return True

    def span_fits(self) -> bool:
        """Whether the decode span in flight (if any) still fits the pool to its last step (after a
        reservation took blocks); if not, the caller wakes the worker to replan at the next step."""
        if not self.in_flight or self.chunks:
            return True
        return self._dec_blocks(self.dstep + self.span[0] - 1) <= self.total - self.own - self.prefix_blocks + self.evictable

    def kv_arrived(self, seq: Seq) -> Seq | None:
        """Decode role: the prompt's KV and first token are in. Returns seq if it is already done
        (a one-token reply: its reservation is let go); else it joins the batch at the next step,
        its blocks reserved until then."""
        if seq.steps == 0:
            self._unreserve(seq)
            seq.done = True
            return seq
        self.joins.append(seq)
        return None

    def _unreserve(self, seq: Seq) -> None:
        """The reservation for seq's prompt ends: its blocks become the sequence's, or free."""
        self.reserved -= 1
        self.own -= -(-seq.length // self.bs)

    def release(self, seq: Seq) -> None:
        """Prefill role: the transfer is acknowledged; the prompt's blocks become cache."""
        self.held -= 1
        self.own -= seq.own
        seq.own = 0
        self._unshare(seq)

    # --- stepping ------------------------------------------------------------------------------

    def wake(self, now: float) -> float | None:
        """Work arrived. Idle: start a step now. In a decode span: end it at the step in flight, so
        the newcomer joins the next step. Returns the new end of the step in flight, if it moved."""
        if not self.in_flight:
            self._take_joins(now)
            return self._plan(now)
        k, a, slope = self.span
        if self.chunks or k <= 1:
            return None  # an explicit step, or one decode step: its end is the next boundary anyway
        i = _steps_within(now - self.started, a, slope) + 1  # the steps done, and the one in flight
        if i >= k:
            return None
        self.span = (i, a, slope)
        self.version += 1
        return self.started + _series(i, a, slope)

    def step_end(self, now: float) -> list:
        """The step (or decode span) in flight ended. Returns what happened, as (event, seq)
        pairs: "prefilled" (prefill role), "first_token" (colocated), "finished"; then plans the
        next step (`in_flight`, the end time in `next_end`)."""
        self.in_flight = False
        out = []
        k = 1 if self.chunks else self.span[0]
        seconds = now - self.started
        self.busy_seconds += seconds
        self.steps += k
        if self.spans is not None and self.started < self.trace_until:
            self._trace(now, k)
        if self.step_decodes:
            self.dstep += k
            self.sink.on_itl((self.started + now) / 2, seconds / k, k * self.step_decodes)
        for seq, n in self.chunks:
            self._computed(seq, n, out, now)
        self.chunks = []
        heap = self.finishes
        while heap and heap[0][0] <= self.dstep:
            seq = heapq.heappop(heap)[2]
            if not seq.done and seq.finish <= self.dstep:
                self._leave_batch(seq)
                seq.done = True
                out.append(("finished", seq))
        self._take_joins(now)
        self.next_end = self._plan(now)
        return out

    def _take_joins(self, now: float) -> None:
        for seq in self.joins:
            self._unreserve(seq)
            self._join(seq, seq.length + 1, seq.steps)  # the prompt and its first token
            seq.req.first_token = now  # reported as it joins (decode_worker's _admit)
            self.sink.on_first_token(seq.req, now)
        self.joins = []

    def _computed(self, seq: Seq, n: int, out: list, now: float) -> None:
        seq.computed += n
        self.prompt_tokens += n
        if seq.computed < seq.length:
            return
        self.prefilling.remove(seq)
        if seq.kind == PROMPT and seq.prefix >= 0 and not seq.shared and self.spec.enable_prefix_caching:
            self._cache_prefix(seq)
        if self.role is Role.PREFILL:
            del self.running[seq]
            self.held += 1
            out.append(("prefilled", seq))
            return
        if seq.req.first_token is None:  # a colocated prompt (or one preempted before its first token)
            seq.req.first_token = now
            self.sink.on_first_token(seq.req, seq.req.first_token)
        elif seq.kind == RECOMPUTE:  # its first token since the preemption: the router sees the whole pause as one gap
            self.sink.on_itl((seq.last_token + now) / 2, now - seq.last_token, 1)
        seq.steps -= 1  # the token sampled as the prompt completes
        if seq.steps == 0:
            del self.running[seq]
            self.own -= seq.own
            seq.own = 0
            self._unshare(seq)
            seq.done = True
            out.append(("finished", seq))
            return
        self.own -= seq.own
        seq.own = 0
        self._join(seq, seq.length + 1, seq.steps)

    def _cache_prefix(self, seq: Seq) -> None:
        blocks = min(seq.req.prefix_len, seq.length) // self.bs
        if blocks and seq.prefix not in self.prefixes:
            self.prefixes[seq.prefix] = [blocks, 1]
            self.prefix_blocks += blocks
            seq.own -= blocks
            self.own -= blocks
            seq.shared = blocks

    def _join(self, seq: Seq, length: int, steps: int) -> None:
        """Into the decode batch at the current decode step: `length` tokens held, `steps` to produce."""
        s = self.dstep
        seq.base = length - s
        seq.finish = s + steps
        self.n_dec += 1
        self.sum_base += seq.base
        self.residues[seq.base % self.bs] += 1
        self.sum_residues += seq.base % self.bs
        self.dec_shared += seq.shared
        self.running[seq] = None  # a colocated sequence whose prompt is done keeps its place: the engine's list is in admission order
        self._order += 1
        heapq.heappush(self.finishes, (seq.finish, self._order, seq))

    def _leave_batch(self, seq: Seq) -> None:
        self.n_dec -= 1
        self.sum_base -= seq.base
        self.residues[seq.base % self.bs] -= 1
        self.sum_residues -= seq.base % self.bs
        self.dec_shared -= seq.shared
        del self.running[seq]
        self._unshare(seq)

    def _preempt_newest(self, now: float) -> None:
        """The newest running sequence goes back to the front of the queue, as a step is planned at
        `now` (when a decoding one's latest token came)."""
        seq = next(reversed(self.running))
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            del self.running[seq]
            self.own -= seq.own
            seq.own = 0
            self._unshare(seq)
        else:
            s = self.dstep
            self._leave_batch(seq)
            seq.length, seq.steps = seq.base + s, seq.finish - s
            seq.done = True  # its heap entry is dead; a new Seq carries on
            seq = _successor(seq, now)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.waiting_blocks += -(-seq.length // self.bs)
        self.preemptions += 1

    def _plan(self, now: float) -> float | None:
        """Schedule the next step (or decode span) at `now`; None if there is nothing to run."""
        if self.waiting or self.prefilling:
            return self._plan_explicit(now)
        if self.n_dec:
            return self._plan_span(now)
        return None

    def _plan_explicit(self, now: float) -> float | None:
        spec, bs, s = self.spec, self.bs, self.dstep
        budget = spec.max_num_batched_tokens
        preempted = False
        while self.n_dec and self.free_blocks(s) < 0:
            self._preempt_newest(now)
            preempted = True
        budget -= self.n_dec
        chunks = []
        for seq in list(self.prefilling):
            if budget <= 0:
                break
            n = min(seq.length - seq.computed, budget, spec.chunk_size)
            need = -(-(seq.computed + n) // bs) - seq.own - seq.shared
            free = self.free_blocks(s)
            if need > free:
                self._preempt_seq(seq)
                preempted = True
                continue
            self._allocate(need, free - self.evictable)
            seq.own += need
            chunks.append((seq, n))
            budget -= n
        while not preempted and self.waiting and budget > 0 and len(self.running) + self.reserved < spec.max_num_seqs:
            seq = self.waiting[0]
            entry = self.prefixes.get(seq.prefix) if seq.prefix >= 0 and spec.enable_prefix_caching else None
            cached = min(entry[0], (seq.length - 1) // bs) if entry else 0
            n = min(seq.length - cached * bs, budget, spec.chunk_size)
            need = -(-(cached * bs + n) // bs) - cached
            newly_shared = entry[0] if cached and entry[1] == 0 else 0
            free = self.free_blocks(s)
            if free - newly_shared < need:
                break
            self.waiting.popleft()
            self.waiting_blocks -= -(-seq.length // bs)
            if cached:
                if entry[1] == 0:
                    self.evictable -= entry[0]
                entry[1] += 1
                self.prefixes.move_to_end(seq.prefix)
                seq.shared = cached
            self._allocate(need, self.free_blocks(s) - self.evictable)
            seq.own = need
            seq.computed = cached * bs
            if seq.kind == PROMPT:
                self.prefix_query_tokens += seq.length
                self.prefix_hit_tokens += seq.computed
                if seq.req.prefill_start is None:
                    seq.req.prefill_start = now
            self.prefilling.append(seq)
            self.running[seq] = None
            chunks.append((seq, n))
            budget -= n
        if not chunks and not self.n_dec:
            return None  # nothing fits now: wait for blocks to come back
        context = self.sum_base + self.n_dec * s
        seconds = self.profile.step_seconds([(n, seq.computed) for seq, n in chunks], self.n_dec, context)
        self._start(now, chunks, (1, seconds, 0.0))
        return now + seconds

    def _preempt_seq(self, seq: Seq) -> None:
        """A prompt chunk that does not fit: the sequence goes back to the queue (see the docstring)."""
        self.prefilling.remove(seq)
        del self.running[seq]
        self.own -= seq.own
        seq.own = 0
        self._unshare(seq)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.waiting_blocks += -(-seq.length // self.bs)
        self.preemptions += 1

    def _plan_span(self, now: float) -> float | None:
        s0 = self.dstep
        while self.n_dec and self.free_blocks(s0) < 0:
            self._preempt_newest(now)
        if self.waiting:
            return self._plan_explicit(now)
        heap = self.finishes
        while heap[0][2].done or heap[0][2].finish != heap[0][0]:
            heapq.heappop(heap)
        n = self.n_dec
        ctx = self.sum_base + n * s0
        a = self.profile.decode_seconds(n, ctx)
        k = max(1, min(heap[0][0] - s0, MAX_SPAN, int(MAX_SPAN_SECONDS / a)))
        # the last step the pool can hold (blocks in use only grow with the step)
        limit = self.total - self.own - self.prefix_blocks + self.evictable
        if self._dec_blocks(s0 + k - 1) > limit:
            lo, hi = 1, k - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self._dec_blocks(s0 + mid - 1) <= limit else (lo, mid - 1)
            k = lo
        need = self._dec_blocks(s0 + k - 1) - self._dec_blocks(s0)
        self._allocate(0, self.free_blocks(s0) - self.evictable - need)  # evicts what the span's growth takes
        slope = (self.profile.decode_seconds(n, ctx + n * (k - 1)) - a) / (k - 1) if k > 1 else 0.0
        self._start(now, [], (k, a, slope))
        return now + _series(k, a, slope)

    def _start(self, now: float, chunks: list, span: tuple) -> None:
        self.in_flight = True
        self.version += 1
        self.started = now
        self.chunks = chunks
        self.span = span
        self.step_decodes = self.n_dec

    def _trace(self, now: float, k: int) -> None:
        from benchmarks.chrome_trace import Span

        if self.chunks:
            tokens = sum(n for _, n in self.chunks)
            name = f"step: {len(self.chunks)} prompt chunks ({tokens} tokens)"
            name += f" + {self.step_decodes} decodes" if self.step_decodes else ""
            args = {"prompt_tokens": tokens, "chunks": len(self.chunks), "decodes": self.step_decodes}
        else:
            name, args = f"decode x{k} (batch {self.step_decodes})", {"steps": k, "batch": self.step_decodes}
        self.spans.append(Span(None, name, self.started, now, self.id, args))


class CachedCosts:
    """The profile's step times, prompt-only steps memoized (prefill workers repeat the same chunk
    shapes: whole chunks at multiples of the chunk size)."""

    def __init__(self, profile):
        self.profile = profile
        self.decode_seconds = profile.decode_seconds
        self._prompt_steps: dict = {}

    def step_seconds(self, prefill: list, decode_batch: int, decode_context: int) -> float:
        if decode_batch:
            return self.profile.step_seconds(prefill, decode_batch, decode_context)
        key = tuple(prefill)
        seconds = self._prompt_steps.get(key)
        if seconds is None:
            if len(self._prompt_steps) > 100_000:
                self._prompt_steps.clear()
            seconds = self._prompt_steps[key] = self.profile.step_seconds(prefill, 0, 0)
        return seconds


def _series(i: int, a: float, slope: float) -> float:
    """Seconds of the first i steps of a span whose steps take a, a + slope, a + 2 slope, ..."""
    return i * a + slope * i * (i - 1) / 2


def _steps_within(elapsed: float, a: float, slope: float) -> int:
    """The most steps of such a span that end by `elapsed`."""
    if slope <= 1e-15 * a:
        i = int(elapsed // a)
    else:  # the root of slope/2 i^2 + (a - slope/2) i = elapsed
        b = a - slope / 2
        i = int((-b + math.sqrt(b * b + 2 * slope * elapsed)) / slope)
    while i > 0 and _series(i, a, slope) > elapsed:
        i -= 1
    while _series(i + 1, a, slope) <= elapsed:
        i += 1
    return i


def _successor(old: Seq, now: float) -> Seq:
    """A preempted decoding sequence carries on as a new one (its finish-heap entry is dead), its
    latest token at `now`."""
    seq = Seq(old.req, RECOMPUTE, old.length, old.steps, old.prefix)
    seq.last_token = now
    return seq

"""Which workers a request goes to.

Decode: among the workers with room for the prompt, the largest free share of the KV pool, then
the fewest sequences. Room and load are the router's view: the worker's latest report, minus what the
router has asked of it since (reservations in flight), so simultaneous arrivals spread out
instead of all landing on the worker that looked emptiest at the last report. A worker has
room when it holds fewer sequences than its max_num_seqs and, for a decode worker, when after
the prompt's blocks every sequence it holds keeps a block to grow into (its own rule for a
reservation). A colocated worker's engine queues and preempts by itself: the count is enough.

Prefill: the worker likely to hold the longest cached prefix of the prompt, unless that would
pile load on it (SGLang's cache-aware rule): when its queued prompt tokens exceed the least
loaded worker's by more than `balance_abs` tokens and by more than `balance_rel` times, the
request goes to the least loaded worker instead. Which prefixes a worker holds is tracked
approximately, by the block-hash chains the router has sent it (the same hashes the engine's
prefix cache uses), bounded per worker by its pool size, least recently used first out.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from engine.block_allocator import hash_blocks
from router.workers import Role, WorkerRecord, WorkerState


def has_room(worker: WorkerRecord, blocks: int) -> bool:
    """Whether, as the router sees it, the decode (or colocated) worker can take a prompt of `blocks` KV blocks now."""
    seqs = worker.running + worker.pending
    if worker.max_num_seqs and seqs >= worker.max_num_seqs:
        return False
    return worker.role is not Role.DECODE or worker.free_blocks - worker.pending_blocks - blocks >= seqs


def decode_order(workers: list[WorkerRecord], blocks: int = 0) -> Iterator[WorkerRecord]:
    """Ready decode (or colocated) workers with room for `blocks`, best first: the largest share of
    their KV pool free (most free blocks, where the size is not known yet), then fewest sequences.
    A share, not a count: pools sized from the memory each worker found free at its start differ by
    tens of blocks, and by count every short request went to the largest until that was used up
    (24 at once all on one of two decode workers, measured), the other idle. Lazily: callers mostly
    take the first, and this runs per request over the whole pool (most of the simulator's time at
    hundreds of workers), so the keys are plain tuples put in a heap in C and room is checked only
    for the workers taken (ids are unique: records never compared). `state is READY and not
    checking` is WorkerRecord.takes_work, inlined here and in choose_prefill: a property call per
    worker per request costs ~0.3 µs, measured at 192-320 workers."""
    heap = [((w.pending_blocks - w.free_blocks) / (w.total_blocks or 1), w.running + w.pending, w.id, w) for w in workers
            if w.state is WorkerState.READY and not w.checking]  # fmt: skip
    heapq.heapify(heap)
    while heap:
        worker = heapq.heappop(heap)[-1]
        if has_room(worker, blocks):
            yield worker


class PrefixIndex:
    """Per prefill worker, the block hashes of prompts recently sent there (LRU, bounded), and per
    hash the workers holding it, so a request's longest cached prefix is found without a scan of every worker."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._held: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[str]] = {}
        self._capacity: dict[str, int] = {}

    def hashes(self, token_ids: list[int]) -> list[int]:
        return hash_blocks(token_ids, self.block_size)

    def set_capacity(self, worker_id: str, blocks: int) -> None:
        self._capacity[worker_id] = blocks

    def holders(self, block_hash: int) -> set[str]:
        return self._holders.get(block_hash, set())

    def longest_prefix_holders(self, hashes: list[int], among: Iterable[str]) -> set[str]:
        """Of the workers `among`, those holding the longest run of `hashes` from its start (none: an
        empty set). Set intersections per block, so a prefix every worker holds costs little."""
        held, deeper = set(), set(among)
        for h in hashes:
            deeper = deeper.intersection(self.holders(h))
            if not deeper:
                break
            held = deeper
        return held

    def record(self, worker_id: str, hashes: list[int]) -> None:
        held = self._held.setdefault(worker_id, OrderedDict())
        for h in hashes:
            if h in held:
                held.move_to_end(h)
            else:
                held[h] = None
                self._holders.setdefault(h, set()).add(worker_id)
        capacity = self._capacity.get(worker_id)
        while capacity is not None and len(held) > capacity:
            self._drop(worker_id, held.popitem(last=False)[0])

    def forget(self, worker_id: str) -> None:
        for h in self._held.pop(worker_id, ()):
            self._drop(worker_id, h)
        self._capacity.pop(worker_id, None)

    def _drop(self, worker_id: str, block_hash: int) -> None:
        holders = self._holders[block_hash]
        holders.discard(worker_id)
        if not holders:
            del self._holders[block_hash]


@dataclass(frozen=True)
class Balance:
    abs_tokens: int = 4096  # cache affinity yields when the chosen worker is this many tokens ahead...
    rel: float = 1.5  # ...and this many times as loaded as the least loaded one


def choose_prefill(workers: list[WorkerRecord], hashes: list[int], index: PrefixIndex, balance: Balance = Balance()) -> WorkerRecord | None:
    """The prefill worker for a request that holds a reservation. Ready workers only, unless every
    one is draining (the whole cluster is): then a draining one finishes what was admitted."""
    ready = ([w for w in workers if w.state is WorkerState.READY and not w.checking]
             or [w for w in workers if w.state is WorkerState.DRAINING and not w.checking])  # fmt: skip
    if not ready:
        return None
    least = min([(w.queued_tokens, len(w.requests), w.id, w) for w in ready])[-1]
    by_id = {w.id: w for w in ready}
    cached = index.longest_prefix_holders(hashes, by_id)  # those holding the most blocks of the prompt
    if not cached:
        return least
    best = max((by_id[i] for i in cached), key=lambda w: (-w.queued_tokens, -len(w.requests), w.id))
    if best is least:
        return least
    overloaded = (best.queued_tokens - least.queued_tokens > balance.abs_tokens
                  and best.queued_tokens > balance.rel * least.queued_tokens)  # fmt: skip
    return least if overloaded else best

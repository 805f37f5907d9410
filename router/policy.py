"""Which workers a request goes to."""

from __future__ import annotations

from router.workers import WorkerRecord


def decode_order(workers: list[WorkerRecord]) -> list[WorkerRecord]:
    """Decode (or colocated) workers to try, best first: most free KV blocks, then fewest running."""
    return sorted((w for w in workers if w.takes_work), key=lambda w: (-w.free_blocks, w.running, w.id))


def choose_prefill(workers: list[WorkerRecord]) -> WorkerRecord | None:
    """The prefill worker with the fewest prompt tokens queued on it."""
    ready = [w for w in workers if w.takes_work]
    return min(ready, key=lambda w: (w.queued_tokens, len(w.requests), w.id), default=None)

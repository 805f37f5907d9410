"""The whole cluster on a simulated clock: one heap of events, entities as plain state.

A request's life, as the router and workers live it (router/router.py, the worker modules):

  arrive     the router's admission queue is first come first served: while it holds requests a
             newcomer queues behind them (or is rejected past max_waiting_requests)
  admit      the first of router.policy.decode_order over the decode pool is asked for the
             reservation; if none has room, or it refuses (its answer brings its load), the request
             waits at the head of the queue until woken (a decode worker finishing a request) or for
             HEAD_RECHECK seconds, then tries again, until admission_timeout ("timeout": it leaves
             the queue, and the next in line tries)
  reserved   the decode worker answers the reservation between two of its steps (its engine thread
             runs commands there), so the router goes on at the end of the step in flight
  prefill    router.policy.choose_prefill (cache-aware, with the router's own PrefixIndex) picks
             the prefill worker; it batches the prompt with others under its token budget
  transfer   the computed prompt's blocks go to the decode worker: the profile's fixed cost +
             bytes / bandwidth of the configured backend; on arrival the prefill worker's blocks
             become cache and the sequence joins the decode batch at the next step
  decode     continuous batching until the request's output length; its blocks return
Colocated: decode_order over the colocated pool; the worker takes the whole request.
The serving stack's own latency per control message (SimConfig.client_hop, worker_hop) is added
to each request's TTFT and E2E as it ends, not to the workers' timing.

The planner, if any, is the object the real cluster runs (cluster.planner.Planner): every
`interval` seconds it gets an Observation built from the simulated workers and the router's
window, and its targets are actuated: new workers start (ready after the start-up time), removed
ones (the least loaded, as cluster._scale picks them) drain, finishing what they hold before they go.

Events: ARRIVAL (the next request, one pending at a time), STEP (a worker's step or decode span
ends; stale ones are skipped by version), TRANSFER (KV landed), READY (a worker started), TIMEOUT
(an admission wait ran out), PLAN (the planner's interval), SAMPLE (a timeline sample), RESERVED
(a reservation answered: the prefill starts), RECHECK (the head of the queue looks again).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from benchmarks.chrome_trace import Span
from benchmarks.run_report import Columns, percentile
from router import policy
from router.workers import Role, WorkerState
from simulator.config import SimConfig
from simulator.worker import PROMPT, CachedCosts, Seq, SimWorker

ARRIVAL, STEP, TRANSFER, READY, TIMEOUT, PLAN, SAMPLE, RESERVED, RECHECK = range(9)
HEAD_RECHECK = 0.5  # router.router's _HEAD_RECHECK: the head of the admission queue looks again this often, woken or not
ROLES = {"prefill": Role.PREFILL, "decode": Role.DECODE, "colocated": Role.COLOCATED}
_PREFIX_HASHES = 1 << 48  # synthetic block hashes: shared prefixes above, unique blocks below


class SimRequest:
    __slots__ = ("id", "arrival", "input_len", "output_len", "prefix_id", "prefix_len", "status", "admitted", "prefill_start",
                 "prefilled", "transferred", "first_token", "finish", "decode", "prefill")  # fmt: skip

    def __init__(self, rid: int, r):
        self.id, self.arrival, self.input_len, self.output_len = rid, r.time, r.input_len, r.output_len
        self.prefix_id, self.prefix_len = r.prefix_id, r.prefix_len
        self.status = None
        self.admitted = self.prefill_start = self.prefilled = self.transferred = self.first_token = self.finish = None
        self.decode = self.prefill = None


@dataclass
class _Window:
    """What the router saw since the planner's last decision."""

    start: float = 0.0
    arrivals: int = 0
    input_tokens: int = 0
    finished: int = 0
    output_tokens: int = 0
    refused: int = 0  # rejected (queue full) or timed out waiting for KV room
    ttft: list = field(default_factory=list)
    itl: list = field(default_factory=list)
    itl_counts: list = field(default_factory=list)


@dataclass
class SimResult:
    columns: Columns
    itl: dict  # {"t", "value", "count"}: runs of equal token gaps
    samples: list
    decisions: list
    duration: float
    worker_seconds: float
    spans: list
    stats: dict
    scale: int = 1  # each request in columns stands for this many of the cluster's (simulator/shards.py)


class Simulation:
    def __init__(self, config: SimConfig, profile, planner=None):
        """`planner`: a cluster.planner.Planner (the cluster's own class) or None for static pools."""
        self.config = config.check()
        self.profile = profile
        self.costs = CachedCosts(profile)
        self.spec = config.engine.resolve(profile)
        self.planner = planner
        self.bs = self.spec.block_size
        self.index = policy.PrefixIndex(self.bs)
        self.balance = policy.Balance()
        self.startup = profile.startup_seconds if config.startup_seconds is None else config.startup_seconds
        self.kv_bytes_per_block = profile.kv_bytes_per_token * self.bs
        self.workers: dict[str, SimWorker] = {}
        self.pools: dict[Role, list[SimWorker]] = {role: [] for role in Role}
        self.records = {role: [] for role in Role}  # the router's WorkerRecords, per pool
        self.started_at: dict[str, float] = {}
        self.ended_at: dict[str, float] = {}
        self.spans: list | None = [] if config.trace_until > 0 else None
        self.columns = Columns()
        self._itl_t, self._itl_v, self._itl_c = [], [], []
        self.samples, self.decisions = [], []
        self.targets = dict(config.pools)
        self.queue: deque[SimRequest] = deque()
        self._head_tries = 0  # the head of the queue's tries in vain: a RECHECK due for an earlier one is stale
        self.window = _Window()
        self._last_counters: dict[str, tuple] = {}  # per worker, the counters at the planner's last observation
        self.now = 0.0
        self._heap: list = []
        self._seq = itertools.count()
        self._names = itertools.count()
        self._unique_hash = 1
        self._live = 0  # requests arrived and not yet ended
        self._last_end = 0.0
        self._arrivals = None
        self._arrivals_left = True
        self.events = 0
        for role, n in config.pools.items():
            for _ in range(n):
                self._add_worker(ROLES[role], ready=True)

    # --- the loop ----------------------------------------------------------------------------------

    def run(self, requests) -> SimResult:
        wall = time.perf_counter()
        self._arrivals = iter(enumerate(requests))
        self._next_arrival()
        self._push(0.0, SAMPLE)
        if self.planner is not None:
            self._push(self.planner.config.interval, PLAN)
        handlers = (self._arrive, self._step, self._transfer, self._ready, self._timeout, self._plan, self._sample, self._reserved,
                    self._recheck)  # fmt: skip
        heap, pop = self._heap, heapq.heappop
        while heap:
            t, _, kind, a, b = pop(heap)
            self.now = t
            self.events += 1
            handlers[kind](a, b)
        end = self._last_end  # the ticks that follow the last request do not count
        worker_seconds = sum(min(self.ended_at.get(w, end), end) - t0 for w, t0 in self.started_at.items() if t0 < end)
        wall = time.perf_counter() - wall
        stats = {"events": self.events, "wall_seconds": wall, "events_per_second": self.events / wall if wall else None,
                 "requests": len(self.columns), "workers_started": len(self.started_at),
                 "preemptions": sum(w.preemptions for w in self.workers.values()),
                 "prefix_hit_tokens": sum(w.prefix_hit_tokens for w in self.workers.values()),
                 "prefix_query_tokens": sum(w.prefix_query_tokens for w in self.workers.values())}  # fmt: skip
        itl = {"t": self._itl_t, "value": self._itl_v, "count": self._itl_c}
        return SimResult(self.columns, itl, self.samples, self.decisions, end, worker_seconds, self.spans or [], stats)

    def _push(self, t: float, kind: int, a=None, b=None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, a, b))

    def _busy(self) -> bool:
        return self._arrivals_left or self._live > 0

    # --- requests ----------------------------------------------------------------------------------

    def _next_arrival(self) -> None:
        nxt = next(self._arrivals, None)
        if nxt is None:
            self._arrivals_left = False
        else:
            self._push(nxt[1].time, ARRIVAL, nxt[0], nxt[1])

    def _arrive(self, rid, r) -> None:
        self._next_arrival()
        req = SimRequest(rid, r)
        self._live += 1
        w = self.window
        w.arrivals += 1
        w.input_tokens += req.input_len
        if -(-(req.input_len + req.output_len) // self.bs) > self.spec.num_kv_blocks:
            return self._end(req, "failed")  # longer than a worker's whole KV pool
        if self.queue:
            if len(self.queue) >= self.config.max_waiting_requests:
                return self._end(req, "rejected")
        else:
            admitted = self._admit(req)
            if admitted:
                return
            if admitted is None and self.config.max_waiting_requests == 0:
                return self._end(req, "rejected")  # it would queue at the back (a refused one goes first, past the bound)
            self._wait_at_head()
        self.queue.append(req)
        self._push(self.now + self.config.admission_timeout, TIMEOUT, req)

    def _admit(self, req: SimRequest) -> bool | None:
        """The first worker of router.policy.decode_order takes the request: True; it refuses the
        reservation: False (the router asks no other); None if no worker has room as the router sees them."""
        role = Role.COLOCATED if self.config.colocated else Role.DECODE
        best = next(policy.decode_order(self.records[role], -(-req.input_len // self.bs)), None)
        if best is None:
            return None
        worker = self.workers[best.id]
        if self.config.colocated:
            req.admitted = worker.step_boundary(self.now)  # as the router hears back; the prompt joins the next step either way
            req.decode = worker
            best.requests.add(req.id)
            worker.add_prompt(Seq(req, PROMPT, req.input_len, req.output_len, req.prefix_id))
            self._wake(worker)
            return True
        if not worker.reserve(req.input_len, self.now):
            worker.sync_record(self.now)  # the refusal carries the worker's load, as every answer does
            return False
        req.admitted = worker.step_boundary(self.now)  # when the router hears back
        req.decode = worker
        best.requests.add(req.id)
        if worker.span_fits():
            worker.sync_record(self.now)
        else:
            self._wake(worker)
        if req.admitted > self.now:
            self._push(req.admitted, RESERVED, req)
        else:
            self._start_prefill(req)
        return True

    def _start_prefill(self, req: SimRequest) -> None:
        hashes = self._hashes(req)
        record = policy.choose_prefill(self.records[Role.PREFILL], hashes, self.index, self.balance)
        if record is None:  # the router answers UNAVAILABLE
            req.decode.reserved -= 1
            req.decode.own -= -(-req.input_len // self.bs)
            return self._end(req, "failed")
        self.index.set_capacity(record.id, record.total_blocks or len(hashes))
        self.index.record(record.id, hashes)
        record.requests.add(req.id)
        record.queued_tokens += req.input_len
        worker = self.workers[record.id]
        req.prefill = worker
        worker.add_prompt(Seq(req, PROMPT, req.input_len, 0, req.prefix_id))
        self._wake(worker)

    def _reserved(self, req: SimRequest, _) -> None:
        self._start_prefill(req)

    def _hashes(self, req: SimRequest) -> list[int]:
        """Block hashes as the router computes them: a shared prefix's are the same for every
        request that has it, the rest are unique."""
        n = req.input_len // self.bs
        k = min(req.prefix_len // self.bs, n) if req.prefix_id >= 0 else 0
        first = _PREFIX_HASHES + req.prefix_id * 65536
        hashes = list(range(first, first + k)) + list(range(self._unique_hash, self._unique_hash + n - k))
        self._unique_hash += n - k
        return hashes

    def _drain_queue(self) -> None:
        """Room may have appeared: the head of the queue tries, and each one admitted lets the next try."""
        while self.queue:
            if not self._admit(self.queue[0]):
                return self._wait_at_head()
            self.queue.popleft()

    def _wait_at_head(self) -> None:
        """The head of the queue tried in vain: it tries again when woken, or after HEAD_RECHECK."""
        self._head_tries += 1
        self._push(self.now + HEAD_RECHECK, RECHECK, self._head_tries)

    def _recheck(self, tries: int, _) -> None:
        if tries == self._head_tries and self.queue:
            self._drain_queue()

    def _timeout(self, req: SimRequest, _) -> None:
        """Its admission wait ran out. At the head it tries once more (its wait ends now), then it
        leaves the queue, and if it led it, the next in line tries."""
        if req.admitted is not None:
            return
        head = self.queue[0] is req
        if head:
            self._drain_queue()
            if req.admitted is not None:
                return
        self.queue.remove(req)
        self._end(req, "timeout")
        if head:
            self._drain_queue()

    def _end(self, req: SimRequest, status: str) -> None:
        req.status = status
        if req.decode is not None:
            req.decode.record.requests.discard(req.id)
        self._live -= 1
        self._last_end = self.now
        if status == "ok":
            hops = self.config.hops
            self.columns.add(req.arrival, req.input_len, req.output_len, "ok", req.first_token - req.arrival + hops, req.finish - req.arrival + hops)
            self.window.finished += 1
            self.window.output_tokens += req.output_len
        else:
            self.columns.add(req.arrival, req.input_len, req.output_len, status)
            self.window.refused += status in ("rejected", "timeout")
        if self.spans is not None and req.arrival < self.config.trace_until:
            self._trace_request(req)

    # --- workers -----------------------------------------------------------------------------------

    def _wake(self, worker: SimWorker) -> None:
        end = worker.wake(self.now)
        if end is not None:
            self._push(end, STEP, worker, worker.version)
        worker.sync_record(self.now)

    def _step(self, worker: SimWorker, version: int) -> None:
        if version != worker.version:
            return
        had_waiting = bool(worker.waiting)
        out = worker.step_end(self.now)
        if worker.next_end is not None:
            self._push(worker.next_end, STEP, worker, worker.version)
        freed = had_waiting and not worker.waiting
        for event, seq in out:
            req = seq.req
            if event == "prefilled":
                req.prefilled = self.now
                nbytes = -(-req.input_len // self.bs) * self.kv_bytes_per_block
                self._push(self.now + self.profile.transfer_seconds(self.config.transfer, nbytes), TRANSFER, req, seq)
            elif event == "finished":
                req.finish = self.now
                self._end(req, "ok")
                freed = True
        worker.sync_record(self.now)
        if freed and self.queue and worker.role is not Role.PREFILL:
            self._drain_queue()
        self._retire_if_drained(worker)

    def _transfer(self, req: SimRequest, pseq: Seq) -> None:
        prefill, decode = req.prefill, req.decode
        req.transferred = self.now
        prefill.release(pseq)
        prefill.record.queued_tokens -= req.input_len
        prefill.record.requests.discard(req.id)
        if prefill.waiting and not prefill.in_flight:
            self._wake(prefill)
        prefill.sync_record(self.now)
        self._retire_if_drained(prefill)
        if decode.kv_arrived(Seq(req, PROMPT, req.input_len, req.output_len - 1)) is not None:  # a one-token reply
            req.first_token = req.finish = self.now
            self.on_first_token(req, self.now)
            self._end(req, "ok")
            decode.sync_record(self.now)
            if self.queue:
                self._drain_queue()
            self._retire_if_drained(decode)
        else:
            self._wake(decode)

    def on_itl(self, t: float, seconds: float, count: int) -> None:
        self._itl_t.append(t)
        self._itl_v.append(seconds)
        self._itl_c.append(count)
        if self.planner is not None:
            self.window.itl.append(seconds)
            self.window.itl_counts.append(count)

    def on_first_token(self, req: SimRequest, t: float) -> None:
        if self.planner is not None:
            self.window.ttft.append(t - req.arrival + self.config.worker_hops)

    def _add_worker(self, role: Role, ready: bool) -> SimWorker:
        name = f"{role.value[0]}{next(self._names)}"
        worker = SimWorker(name, role, self.spec, self.costs, self, self.spans, self.config.trace_until)
        self.workers[name] = worker
        self.pools[role].append(worker)
        self.records[role].append(worker.record)
        self.started_at[name] = self.now
        if ready:
            worker.record.state = WorkerState.READY
        else:
            self._push(self.now + self.startup, READY, worker)
        return worker

    def _ready(self, worker: SimWorker, _) -> None:
        if worker.record.state is WorkerState.STARTING:
            worker.record.state = WorkerState.READY
            if self.queue:
                self._drain_queue()

    def _retire_if_drained(self, worker: SimWorker) -> None:
        if worker.record.state is WorkerState.DRAINING and worker.is_empty():
            self._retire(worker)

    def _retire(self, worker: SimWorker) -> None:
        worker.record.state = WorkerState.DEAD
        self.pools[worker.role].remove(worker)
        self.records[worker.role].remove(worker.record)
        self.index.forget(worker.id)
        self.ended_at[worker.id] = self.now

    # --- the planner -------------------------------------------------------------------------------

    def _plan(self, *_) -> None:
        if not self._busy():
            return
        decision = self.planner.decide(self._observe(), self.now)
        self.window = _Window(start=self.now)
        for p in decision.pools:
            self.decisions.append({"at": round(self.now, 6), "role": p.role, "current": p.current, "target": p.target,
                                   "direction": p.direction, "reason": p.reason, "detail": p.detail})  # fmt: skip
        for role, target in decision.targets.items():
            self.targets[role] = target
            self._resize(ROLES[role], target)
        self._push(self.now + self.planner.config.interval, PLAN)

    def _resize(self, role: Role, target: int) -> None:
        live = [w for w in self.pools[role] if w.record.state in (WorkerState.STARTING, WorkerState.READY)]
        for _ in range(target - len(live)):
            self._add_worker(role, ready=False)
        # as cluster._scale: the least loaded go first, the newest of equals; they drain (a starting one at once)
        victims = sorted(reversed(live), key=lambda w: (len(w.record.requests), w.record.queued_tokens))
        for worker in victims[: max(0, len(live) - target)]:
            worker.record.state = WorkerState.DRAINING
            self._retire_if_drained(worker)

    def _observe(self):
        from cluster.planner import Observation, Percentiles, PoolObservation, Window, WorkerObservation

        last, counters = self._last_counters, {}
        pools = {}
        for role in ([Role.COLOCATED] if self.config.colocated else [Role.PREFILL, Role.DECODE]):
            workers = []
            for w in self.pools[role]:
                c = counters[w.id] = (w.busy_seconds, w.prompt_tokens, w.refused)
                b = last.get(w.id, (0.0, 0, 0))
                workers.append(WorkerObservation(
                    id=w.id, state=w.record.state.value, queued_tokens=w.record.queued_tokens, running=len(w.running),
                    waiting=len(w.waiting) + w.reserved, kv_used_blocks=w.used_blocks(self.now), kv_total_blocks=w.total,
                    busy_seconds=c[0] - b[0], prompt_tokens=c[1] - b[1], refused=c[2] - b[2],
                    max_seqs=self.spec.max_num_seqs if role is not Role.PREFILL else 0,
                ))  # fmt: skip
            pools[role.value] = PoolObservation(tuple(workers))
        self._last_counters = counters
        win = self.window
        duration = max(self.now - win.start, 1e-9)
        window = Window(
            duration=duration, arrivals=win.arrivals, finished=win.finished,
            mean_input_len=win.input_tokens / win.arrivals if win.arrivals else None,
            mean_output_len=win.output_tokens / win.finished if win.finished else None,
            refused=win.refused, admission_queue=len(self.queue),
            ttft_ms=Percentiles(*_percentiles([x * 1000 for x in win.ttft])),
            itl_ms=Percentiles(*_percentiles([x * 1000 for x in win.itl], win.itl_counts)),
        )  # fmt: skip
        return Observation(window=window, pools=pools, block_size=self.bs)

    # --- the timeline ------------------------------------------------------------------------------

    def _sample(self, *_) -> None:
        pools, queued, used, total = {}, 0, 0, 0
        for role, workers in self.pools.items():
            ready = [w for w in workers if w.record.state is WorkerState.READY]
            if not workers and role.value not in self.targets:
                continue
            pools[role.value] = len(ready)
            if role is not Role.DECODE:
                queued += sum(w.record.queued_tokens for w in workers)  # the router's count, as a real run's timeline has it
            if role is not Role.PREFILL:
                used += sum(w.used_blocks(self.now) for w in ready)
                total += sum(w.total for w in ready)
        self.samples.append({"t": round(self.now, 6), "pools": pools, "targets": dict(self.targets), "queued_prompt_tokens": queued,
                             "kv_usage": used / total if total else None, "admission_queue": len(self.queue)})  # fmt: skip
        if self._busy():
            self._push(self.now + self.config.sample_interval, SAMPLE)

    def _trace_request(self, req: SimRequest) -> None:
        rid, end = str(req.id), req.finish if req.finish is not None else self.now
        marks = [("queued", req.arrival, req.admitted or end, None)]
        if req.admitted is not None:
            p, d = req.prefill, req.decode
            if p is not None:
                marks += [("prefill queue", req.admitted, req.prefill_start, p), ("prefill", req.prefill_start, req.prefilled, p),
                          ("transfer", req.prefilled, req.transferred, p), ("joining", req.transferred, req.first_token, d)]  # fmt: skip
            else:
                marks += [("prefill queue", req.admitted, req.prefill_start, d), ("prefill", req.prefill_start, req.first_token, d)]
            marks.append(("decode", req.first_token, end, d))
        lengths = {"input_len": req.input_len, "output_len": req.output_len}
        for phase, start, stop, worker in marks:
            if start is not None and stop is not None:
                self.spans.append(Span(rid, phase, start, stop, worker.id if worker else "", lengths))


def _percentiles(values: list, weights: list | None = None) -> tuple:
    if not values:
        return (None, None, None)
    return tuple(percentile(values, q, weights) for q in (50, 90, 99))



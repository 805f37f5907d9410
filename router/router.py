"""The life of a request in the router (disaggregated mode):

  admit     reserve KV blocks for the prompt on a decode worker D with room for it (as the router
            sees it: the workers' reports minus what it has asked of them since), the largest free
            share of its KV pool first (router/policy.py). First come first served: while requests
            wait, newcomers queue behind them, at most max_waiting_requests (beyond that
            RESOURCE_EXHAUSTED at once); only the head of the queue tries, woken when room may
            have appeared. Waiting past admission_timeout is
            RESOURCE_EXHAUSTED too (UNAVAILABLE if the pool has no ready worker: a pool the cluster
            is restoring, after it lost every worker, is waited for like a full one; with no pool
            asked for and no worker on its way, UNAVAILABLE at once). Moved requests (below) were
            admitted once: they go first.
  prefill   pick a prefill worker P (longest cached prefix unless that one is overloaded, then
            fewest queued tokens) and ask it to compute the prompt and ship the KV and first
            token into D's reservation (a background task)
  stream    D's new tokens arrive through the router's long poll of D (all of D's sequences,
            once per step); each is detokenized, stop strings are applied, and the delta goes
            to the client: the steps a stream is behind on in one response, and with
            stream_interval n > 1 at least n tokens a response (the first and last at once)
  move      a worker of the request dies (or is removed), its transfer fails, its prefill fails or
            times out, or its worker makes no progress on it for stall_timeout (a hung step:
            the worker still answers): whatever is left of the attempt is aborted, and the request is admitted
            again as a new attempt whose prompt is the client's prompt plus every token streamed
            so far (`output_offset` tells the workers how many: max_tokens and the seeded sampler
            count from there). Before the first token this is a retry the client never sees;
            after it, a migration the stream continues through, nothing missing or repeated. At
            most migration_limit moves, then UNAVAILABLE with the reason.
  finish    D reports stop/length, or a stop string hits here, or the client cancels, calls
            Abort, or its deadline passes: whatever is still live on P or D is aborted there,
            so both free their blocks

In colocated mode a request goes whole to one worker, which does both phases; a move re-submits it.
Workers know each attempt by a key of its own (the client's id + a suffix): outputs of an earlier
attempt can never reach a later one. Every wait is bounded: admission, each control call (at
most max_calls_per_worker at once per worker), the prefill, and the gap between tokens.

Each request keeps a timeline of its lifetime events (seconds since arrival, and the worker):
arrived, reserved (colocated: admitted), prefill_queued, prefill_started, prefill_ended,
transfer_started, transfer_ended (these four measured by the prefill worker), first_token,
migrated, finished. The client gets it with the last response; the phases between them go to
the metrics.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace

from engine.detokenizer import IncrementalDetokenizer
from engine.engine_loop import EngineStopped
from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams
from router import policy
from router.metrics import Metrics
from router.phases import PhaseEvent, phase_durations
from router.window import RequestWindow
from router.workers import Role, WorkerRecord, WorkerState

logger = logging.getLogger(__name__)

_HEAD_RECHECK = 0.5  # seconds: the head of the admission queue looks again this often, woken or not
_STALL_CHECK_INTERVAL = 0.5  # seconds: how often stalled streams are looked for (their timeouts are minutes)
_ABORTS_REMEMBERED = 4096  # attempt keys whose abort got through, kept so late tokens for them send no other


class RequestError(Exception):
    """Ends a request with a gRPC status code (by name) and a message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RouterConfig:
    mode: str = "disaggregated"  # or "colocated"
    admission_timeout: float = 60.0  # waiting for KV blocks before RESOURCE_EXHAUSTED
    max_waiting_requests: int = 256  # the admission queue; beyond it RESOURCE_EXHAUSTED at once
    migration_limit: int = 3  # moves (retries and migrations) per request, then UNAVAILABLE
    call_timeout: float = 30.0  # one control call to a worker
    max_calls_per_worker: int = 32  # control calls in flight to one worker
    prefill_timeout: float = 600.0  # prompt computed and its KV delivered
    stall_timeout: float = 300.0  # longest gap between two events of a live request; past it, it moves
    poll_timeout: float = 1.0  # the decode workers' long poll
    liveness_interval: float = 2.0  # how often an idle prefill worker is checked
    # A started worker whose actor answers nothing (its long poll, or a ping: both answered off the
    # engine thread) for this long is taken as dead: frozen (SIGSTOP, a hung host) is not reported
    # by Ray as a death, and its requests would otherwise fail at stall_timeout instead of moving.
    unresponsive_after: float = 30.0
    stream_interval: int = 1  # tokens held back until a response carries this many (fewer responses: less CPU a token)
    balance: policy.Balance = field(default_factory=policy.Balance)  # cache affinity vs load, prefill routing


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asked
    timeline: list[PhaseEvent] = field(default_factory=list)  # on the last chunk
    step_time: float = 0.0  # Unix time the decode worker produced the oldest of these tokens (0: unknown)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the first chunk, when the request asked
    stop_reason: str | int | None = None  # on the last chunk: the stop string or stop token id that ended it (vLLM's; EOS: None)


# Events on a request's queue; `key` names the attempt they are about (None: the request itself).
@dataclass
class _Tokens:
    key: str | None  # None: the router's own Abort
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None
    step_time: float = 0.0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # a colocated worker's, with an attempt's first tokens


@dataclass
class _PromptLogprobs:
    """A prefill worker's answer, when the request asked for prompt logprobs."""

    key: str
    logprobs: list[TokenLogprobs | None] | None  # None: not asked of this attempt (they had come already)


@dataclass
class _Lost:
    """The attempt cannot go on, but a new one may: the request moves."""

    key: str
    reason: str  # a metric label
    message: str


@dataclass
class _Failure:
    key: str
    code: str
    message: str


@dataclass
class _Request:
    id: str  # the client's
    key: str  # the current attempt's: what workers know it by (clients may reuse ids)
    prompt_token_ids: list[int]  # the client's
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    owner: str = ""  # who made it (router.auth): only they may abort it
    output_ids: list[int] = field(default_factory=list)  # streamed to the client so far
    events: collections.deque = field(default_factory=collections.deque)  # for _stream, in order
    waiter: asyncio.Future | None = None  # _stream waits on it while `events` is empty...
    stall_deadline: float = 0.0  # ...until this loop time (Router._watch_stalls fails the wait after it)
    stall_timeout: float = 0.0
    decode: WorkerRecord | None = None  # the decode/colocated worker, from the moment it is asked
    destination: dict | None = None  # D's reservation: its receiver's address and the block ids
    prefill: WorkerRecord | None = None
    prefill_task: asyncio.Task | None = None
    worker_finished: bool = False  # the decode/colocated worker reported the attempt's end
    aborted: bool = False  # Abort was called: stop trying to place it
    done: bool = False
    moves: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # while it waits for admission
    arrival: float = field(default_factory=time.perf_counter)
    last_token: float | None = None  # when the latest tokens were streamed
    attempt_streamed: bool = False  # the current attempt has streamed tokens
    timeline: list[PhaseEvent] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once computed, when params.prompt_logprobs asks

    @property
    def token_ids(self) -> list[int]:
        """The current attempt's prompt."""
        return self.prompt_token_ids + self.output_ids

    @property
    def awaits_prompt_logprobs(self) -> bool:
        """Asked for, not come yet: nothing is streamed until they are (they go first)."""
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    def attempt_params(self, computes_prompt: bool = True) -> dict:
        """The params a worker gets: prompt logprobs asked only of the one computing the prompt
        (not a decode worker given its KV), and only while they are awaited."""
        if self.params.prompt_logprobs is None or (computes_prompt and self.awaits_prompt_logprobs):
            return asdict(self.params)
        return asdict(replace(self.params, prompt_logprobs=None))

    def mark(self, event: str, worker: str = "", at: float | None = None) -> None:
        self.timeline.append(PhaseEvent(event, (at or time.perf_counter()) - self.arrival, worker))


class Router:
    def __init__(
        self, tokenizer, block_size: int, config: RouterConfig = RouterConfig(),
        on_workers_changed: Callable[[], None] = lambda: None, metrics: Metrics | None = None,
    ):  # fmt: skip
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.config = config
        self.metrics = metrics
        self.prefix_index = policy.PrefixIndex(block_size)
        self.workers: dict[str, WorkerRecord] = {}
        self.targets: dict[Role, int] = {}  # pool sizes asked for (the cluster sets them; supervision restores them)
        self.requests: dict[str, _Request] = {}  # live requests by client id
        self._by_key: dict[str, _Request] = {}  # the same, by the current attempt's key
        self._queue: collections.deque[_Request] = collections.deque()  # waiting for admission, first come first
        self._slots: dict[str, asyncio.Semaphore] = {}  # per worker: control calls in flight
        self._deaths: dict[str, asyncio.Event] = {}  # per worker: set when it is declared dead
        # Aborts, as (worker id, attempt key): in flight, and the last ones that got through (outputs
        # for those afterwards were produced before; see _abort_strays).
        self._aborting: set[tuple[str, str]] = set()
        self._aborted: dict[tuple[str, str], None] = {}
        self._on_workers_changed = on_workers_changed
        self._tasks: set[asyncio.Task] = set()
        self.closed = False  # shutting down: nothing new is admitted
        self.window: RequestWindow | None = None  # the autoscaler's, when one runs
        self._stall_watchdog: asyncio.Task | None = None

    # --- workers ---------------------------------------------------------------------------------

    def add_worker(self, worker: WorkerRecord) -> None:
        self.workers[worker.id] = worker
        self._deaths[worker.id] = asyncio.Event()
        self._spawn(self._watch(worker) if worker.role is Role.PREFILL else self._poll(worker))
        self._on_workers_changed()

    def set_state(self, worker_id: str, state: WorkerState) -> None:
        self.workers[worker_id].state = state
        self._on_workers_changed()
        self._room_may_have_appeared()

    def remove_worker(self, worker_id: str) -> None:
        """The worker leaves the pool; requests still on it move elsewhere."""
        worker = self.workers.pop(worker_id, None)
        self.prefix_index.forget(worker_id)
        self._slots.pop(worker_id, None)
        self._deaths.pop(worker_id, None)
        if worker is not None:
            if self.metrics is not None:  # a replaced or scaled-away worker's series go with it
                self.metrics.forget_worker(worker.role.value, worker_id)
            self._lose_requests_on(worker, "removed", f"{worker.role.value} worker {worker.id} was removed")
        self._on_workers_changed()

    def awaiting_prefill(self) -> bool:
        """Whether a request holds a decode reservation and has yet to be sent to a prefill worker."""
        return any(req.decode is not None and req.prefill is None and not req.done for req in self.requests.values())

    @property
    def admission_queue(self) -> int:
        """Requests waiting for KV room on a decode (or colocated) worker."""
        return len(self._queue)

    def of_role(self, role: Role) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.role is role]

    def set_target(self, role: Role, size: int) -> None:
        self.targets[role] = size
        self._on_workers_changed()

    def pools(self) -> dict[str, dict[str, int]]:
        """Each pool's size asked for, and its workers ready now (fewer: the pool is short)."""
        return {role.value: {"target": size, "ready": sum(w.state is WorkerState.READY for w in self.of_role(role))}
                for role, size in self.targets.items()}  # fmt: skip

    def serving(self) -> bool:
        if self.closed:
            return False
        ready = {w.role for w in self.workers.values() if w.state is WorkerState.READY}  # a sibling's check is no outage
        if self.config.mode == "colocated":
            return Role.COLOCATED in ready
        return {Role.PREFILL, Role.DECODE} <= ready

    def close_admission(self) -> None:
        """Shutting down: new requests get UNAVAILABLE, and so do those still waiting for admission."""
        self.closed = True
        for req in self._queue:
            req.wake.set()
        self._on_workers_changed()

    # --- requests --------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, owner: str = ""
    ) -> AsyncIterator[Chunk]:
        """The request's chunks, as they come. `owner` (router.auth's caller id) alone may abort it."""
        if request_id in self.requests:
            raise RequestError("INVALID_ARGUMENT", f"request id {request_id!r} is already in use")
        if self.closed:
            self._refused("shutting_down")
            raise RequestError("UNAVAILABLE", "the server is shutting down")
        req = _Request(request_id, self._new_key(request_id), prompt_token_ids, params, self._detokenizer(prompt_token_ids, params), owner)
        req.mark("arrived", at=req.arrival)
        self.requests[request_id] = self._by_key[req.key] = req
        if self.window is not None:
            self.window.arrived(len(prompt_token_ids))
        try:
            await self._place(req)
            async for chunk in self._stream(req):
                yield chunk
        except RequestError as e:
            if e.code == "RESOURCE_EXHAUSTED" and self.window is not None:
                self.window.refused()
            raise
        finally:
            self._release(req)

    def _detokenizer(self, prompt_token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens,
                                      params.include_stop_str_in_output, params.min_tokens)  # fmt: skip

    def abort(self, request_id: str, owner: str = "") -> bool:
        req = self.requests.get(request_id)
        if req is None or req.owner != owner:
            return False
        req.aborted = True
        self._post(req, _Tokens(None, [], "abort"))
        req.wake.set()  # if it waits for admission
        return True

    async def _place(self, req: _Request) -> None:
        """Admit the current attempt on a decode (or colocated) worker; disaggregated, start its prefill."""
        await self._admit(req)
        if self.config.mode != "colocated" and not req.aborted:
            await self._start_prefill(req)

    # --- admission -------------------------------------------------------------------------------

    async def _admit(self, req: _Request) -> None:
        deadline = time.monotonic() + self.config.admission_timeout
        role = Role.COLOCATED if self.config.mode == "colocated" else Role.DECODE
        blocks = -(-len(req.token_ids) // self.block_size)
        refused = False  # by the worker the router's view had chosen: wait before trying again
        try:
            while not req.aborted:
                if self.closed:
                    self._refused("shutting_down")
                    raise RequestError("UNAVAILABLE", "the server is shutting down")
                workers = self.of_role(role)
                on_its_way = self.targets.get(role) or any(w.state in (WorkerState.READY, WorkerState.STARTING) for w in workers)
                if not req.moves and not on_its_way:
                    raise RequestError("UNAVAILABLE", f"no {role.value} worker is ready to take requests")
                if not refused and (req.moves or not self._queue or self._queue[0] is req):  # moved ones go first
                    best = next(policy.decode_order(workers, blocks), None)
                    if best is not None:
                        self._leave_queue(req)
                        if await self._try(req, best, blocks):
                            return
                        self._rekey(req)  # what the try may have left behind (an abort on its way, a death notice) stays behind
                        refused = best.state is not WorkerState.DEAD  # a dead one: try the next at once
                        continue
                if req not in self._queue:
                    self._join_queue(req, front=refused or req.moves > 0)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = f"no {role.value} worker could reserve KV blocks for {len(req.token_ids)} prompt tokens"
                    why += f" within {self.config.admission_timeout:.0f}s"
                    if req.moves:  # its worker was lost, and no other took it
                        raise RequestError("UNAVAILABLE", f"the request lost its worker and {why}")
                    if not any(w.state is WorkerState.READY for w in workers):
                        raise RequestError("UNAVAILABLE", f"the {role.value} pool is short (no worker ready): {why}")
                    raise RequestError("RESOURCE_EXHAUSTED", why)
                req.wake.clear()
                head = self._queue[0] is req
                try:
                    await asyncio.wait_for(req.wake.wait(), min(_HEAD_RECHECK, remaining) if head else remaining)
                except asyncio.TimeoutError:
                    pass
                refused = False
        finally:
            self._leave_queue(req)

    def _join_queue(self, req: _Request, front: bool) -> None:
        """Moved (already accepted) requests and one just refused go first; newcomers queue at the
        back, and find the door shut when the queue is full."""
        if front:
            self._queue.appendleft(req)
        elif len(self._queue) >= self.config.max_waiting_requests:
            self._refused("queue_full")
            raise RequestError(
                "RESOURCE_EXHAUSTED",
                f"the cluster is at capacity and {len(self._queue)} requests are already waiting (max_waiting_requests)",
            )
        else:
            self._queue.append(req)
        self._observe_queue()

    def _leave_queue(self, req: _Request) -> None:
        if req in self._queue:
            first = self._queue[0] is req
            self._queue.remove(req)
            self._observe_queue()
            if first:
                self._room_may_have_appeared()  # the next in line takes its turn

    def _room_may_have_appeared(self) -> None:
        if self._queue:
            self._queue[0].wake.set()

    async def _try(self, req: _Request, worker: WorkerRecord, blocks: int) -> bool:
        """Ask `worker` for a reservation (colocated: to take the request); True if it did."""
        worker.pending += 1
        worker.pending_blocks += blocks
        try:
            if self.config.mode == "colocated":
                answer = await self._ask(req, worker, "submit", req.key, req.token_ids, req.attempt_params(), len(req.output_ids))
            else:
                params = req.attempt_params(computes_prompt=False)  # the prompt's KV comes from a prefill worker
                answer = await self._ask(req, worker, "reserve", req.key, req.token_ids, params, len(req.output_ids))
        finally:
            worker.pending -= 1
            worker.pending_blocks -= blocks
        if answer is None:
            return False
        self._apply_load(worker, answer["load"])
        if self.config.mode == "colocated":
            req.mark("admitted", worker.id)
            return True
        if answer["block_ids"] is None:
            self._unbind(req)
            return False
        req.destination = {"address": answer["address"], "block_ids": answer["block_ids"]}
        req.mark("reserved", worker.id)
        return True

    async def _ask(self, req: _Request, worker: WorkerRecord, method: str, *args) -> dict | None:
        """Await a call that may leave `req` on decode/colocated `worker` (a reservation, or the
        request itself). The request is the worker's while the call is out: outputs that come
        before the answer are taken, a cancel aborts it there, and a draining worker waits for
        it. None, and the request unbound, if the worker is gone or did not answer in time (then
        it is told to drop whatever it may have taken)."""
        self._bind(req, worker)
        try:
            return await self._call(worker, method, *args)
        except _WorkerGone as e:
            self._unbind(req)
            self._worker_died(worker, e)
        except asyncio.TimeoutError:
            self._unbind(req)
            self._spawn(self._abort_on(req.key, [worker]))
        return None

    def _bind(self, req: _Request, worker: WorkerRecord) -> None:
        req.decode = worker
        worker.requests.add(req.key)

    def _unbind(self, req: _Request) -> None:
        req.decode.requests.discard(req.key)
        req.decode = None

    # --- prefill ---------------------------------------------------------------------------------

    async def _start_prefill(self, req: _Request) -> None:
        """Send the prompt to a prefill worker (a background task). A moved request, or any while
        the cluster is restoring the prefill pool, waits for one (up to admission_timeout: a
        replacement may be starting); otherwise it is refused at once."""
        hashes = self.prefix_index.hashes(req.token_ids)
        deadline = time.monotonic() + self.config.admission_timeout
        while (worker := self._choose_prefill(hashes)) is None:
            if not (req.moves or self.targets.get(Role.PREFILL)) or self.closed or time.monotonic() >= deadline:
                raise RequestError("UNAVAILABLE", "no prefill worker is ready to take requests")
            await asyncio.sleep(0.1)
            if req.aborted:
                return
        self.prefix_index.set_capacity(worker.id, worker.total_blocks or len(hashes))
        self.prefix_index.record(worker.id, hashes)
        req.prefill = worker
        worker.requests.add(req.key)
        worker.queued_tokens += len(req.token_ids)
        req.mark("prefill_queued", worker.id)
        req.prefill_task = self._spawn(self._prefill(req, worker, req.key, req.token_ids, req.destination))

    def _choose_prefill(self, hashes: list[int]) -> WorkerRecord | None:
        return policy.choose_prefill(self.of_role(Role.PREFILL), hashes, self.prefix_index, self.config.balance)

    async def _prefill(self, req: _Request, worker: WorkerRecord, key: str, token_ids: list[int], destination: dict) -> None:
        """One attempt's prefill (its key, prompt and reservation fixed when it was sent)."""
        sent = time.perf_counter()
        try:
            output_offset = len(token_ids) - len(req.prompt_token_ids)
            call = worker.handle.prefill.remote(key, token_ids, req.attempt_params(), destination, output_offset)
            result = await asyncio.wait_for(call, self.config.prefill_timeout)
            for event, seconds in result["phases"].items():  # measured on the worker from the call's arrival
                req.mark(event, worker.id, at=sent + seconds)
            req.timeline.sort(key=lambda e: e.seconds)
            if req.params.prompt_logprobs is not None:
                self._post(req, _PromptLogprobs(key, result.get("prompt_logprobs")))
        except asyncio.TimeoutError:
            self._spawn(self._abort_on(key, [worker]))
            message = f"prefill on {worker.id} did not finish within {self.config.prefill_timeout:.0f}s"
            self._lose(req, key, "prefill_timeout", message)
        except Exception as e:  # noqa: BLE001 - a worker error, its death, a failed transfer
            if _is_worker_death(e):
                self._worker_died(worker, e)
            elif isinstance(getattr(e, "cause", None), ValueError):  # the request itself is at fault: trying again won't help
                self._post(req, _Failure(key, "INVALID_ARGUMENT", f"prefill on {worker.id} refused the request: {_describe(e)}"))
            else:
                self._lose(req, key, "prefill_failed", f"prefill on {worker.id} failed: {_describe(e)}")
        finally:
            worker.queued_tokens -= len(token_ids)
            worker.requests.discard(key)

    # --- streaming and moving --------------------------------------------------------------------

    async def _stream(self, req: _Request) -> AsyncIterator[Chunk]:
        """The request's chunks. Asked-for prompt logprobs go first, on the first chunk: until they
        come (from the prefill worker's answer, or with a colocated worker's first tokens) nothing
        is sent, so a lost attempt then starts over from the prompt, as if it had not run."""
        awaiting = max(self.config.prefill_timeout, self.config.stall_timeout)  # the prefill comes first
        timeout = awaiting
        held: Chunk | None = None  # streamed tokens not yet sent (stream_interval, prompt logprobs)
        last: Chunk | None = None  # the last chunk, held while prompt logprobs are awaited
        first = True
        while True:
            if last is not None and not req.awaits_prompt_logprobs:
                yield self._first(req, last) if first else last
                return
            if not req.events:
                await self._wait_for_events(req, awaiting if req.awaits_prompt_logprobs else timeout)
            event = _next_event(req.events)
            if event.key not in (None, req.key):
                continue  # about an earlier attempt
            if isinstance(event, _Failure):
                raise RequestError(event.code, event.message)
            if isinstance(event, _PromptLogprobs):
                if not req.awaits_prompt_logprobs:
                    continue
                if event.logprobs is None:
                    raise RequestError("INTERNAL", f"the prefill of {req.id} answered without the prompt logprobs it was asked for")
                req.prompt_logprobs = event.logprobs[: len(req.prompt_token_ids)]
                if held is not None and last is None:
                    yield self._first(req, held)
                    held, first = None, False
                continue
            if isinstance(event, _Lost):
                if req.awaits_prompt_logprobs:
                    held = last = None
                    req.output_ids, req.last_token = [], None
                    req.detokenizer = self._detokenizer(req.prompt_token_ids, req.params)
                await self._move(req, event)
                timeout = awaiting
                continue
            if last is not None:  # ended, its prompt logprobs awaited: tokens past the end are not the client's
                if event.key is None and event.finish_reason == "abort":  # but the caller's abort ends the wait (not the worker's)
                    yield self._first(req, last) if first else last
                    return
                continue
            timeout = self.config.stall_timeout
            tokens, finish_reason, logprobs = event.token_ids, event.finish_reason, event.logprobs
            if event.prompt_logprobs is not None and req.awaits_prompt_logprobs:
                req.prompt_logprobs = event.prompt_logprobs[: len(req.prompt_token_ids)]
            req.worker_finished |= event.key is not None and finish_reason is not None
            text = ""
            if req.detokenizer is not None:
                consumed = req.detokenizer.add_tokens(tokens, ends_with_stop_token=finish_reason == "stop")  # a worker stops on tokens only
                if req.detokenizer.stopped:
                    tokens, finish_reason = tokens[:consumed], "stop"
                    logprobs = logprobs[:consumed] if logprobs is not None else None
                text = req.detokenizer.take_delta(finished=finish_reason is not None)
            req.output_ids += tokens
            self._observe(req, len(tokens), finish_reason is not None)
            if finish_reason is not None:
                req.mark("finished", req.decode.id if req.decode else "")
                self._observe_phases(req)
                last = _joined(held, Chunk(tokens, text, finish_reason, logprobs, req.timeline, event.step_time,
                                           stop_reason=_stop_reason(req, finish_reason)))  # fmt: skip
                held = None
                if finish_reason == "abort":  # the caller's: nothing more is waited for
                    yield last
                    return
                if not req.worker_finished and req.awaits_prompt_logprobs:  # a stop string: the worker would go on meanwhile
                    req.worker_finished = True
                    self._spawn(self._abort_on(req.key, [req.decode]))
                continue
            held = _joined(held, Chunk(tokens, text, logprobs=logprobs, step_time=event.step_time))
            if req.awaits_prompt_logprobs:
                continue
            if len(held.token_ids) >= self.config.stream_interval or len(held.token_ids) == len(req.output_ids):  # first ones at once
                yield self._first(req, held) if first else held
                held, first = None, False

    @staticmethod
    def _first(req: _Request, chunk: Chunk) -> Chunk:
        chunk.prompt_logprobs = req.prompt_logprobs
        return chunk

    async def _move(self, req: _Request, lost: _Lost) -> None:
        """The attempt is lost: end what is left of it and place the request again, resuming after
        the tokens already streamed."""
        if req.moves >= self.config.migration_limit:
            raise RequestError("UNAVAILABLE", f"{lost.message}; not moved again: {req.moves} moves is the migration limit")
        if self.closed:
            raise RequestError("UNAVAILABLE", f"{lost.message}; the server is shutting down")
        req.moves += 1
        logger.info("moving %s (%d tokens streamed): %s", req.id, len(req.output_ids), lost.message)
        if self.metrics is not None:
            (self.metrics.migrations if req.output_ids else self.metrics.retries).labels(lost.reason).inc()
        req.mark("migrated", req.decode.id if req.decode else "")
        self._end_attempt(req)
        self._rekey(req)
        req.attempt_streamed = False
        await self._place(req)

    def _rekey(self, req: _Request) -> None:
        """A new attempt: whatever is still said about the previous one no longer reaches the request."""
        del self._by_key[req.key]
        req.key = self._new_key(req.id)
        self._by_key[req.key] = req

    def _observe(self, req: _Request, streamed_tokens: int, finished: bool) -> None:
        """TTFT, ITL and E2E into the metrics (labelled with the decode worker) and the autoscaler's
        window. ITL is per token: an event of k tokens (the poll fell behind the worker's steps)
        counts as k gaps of 1/k of the time since the last, as the simulator and the benchmarks count."""
        if streamed_tokens and not req.attempt_streamed:
            req.attempt_streamed = True
            req.mark("first_token", req.decode.id if req.decode else "")
        now = time.perf_counter()
        latencies = None if self.metrics is None or req.decode is None else self.metrics.latencies(req.decode.role.value, req.decode.id)
        if streamed_tokens:
            first = req.last_token is None
            seconds = now - (req.arrival if first else req.last_token)
            if first:
                if latencies is not None:
                    latencies[0].observe(seconds)
                if self.window is not None:
                    self.window.first_token(seconds)
            else:
                per_token = seconds / streamed_tokens
                if latencies is not None:
                    for _ in range(streamed_tokens):
                        latencies[1].observe(per_token)
                if self.window is not None:
                    self.window.gap(per_token, streamed_tokens)
            req.last_token = now
        if finished:
            if latencies is not None and req.last_token is not None:
                latencies[2].observe(req.last_token - req.arrival)
            if self.window is not None:
                self.window.finished(len(req.output_ids))

    def _observe_phases(self, req: _Request) -> None:
        if self.metrics is not None:
            for phase, seconds in phase_durations(req.timeline):
                self.metrics.phase.labels(phase).observe(seconds)

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.waiting.set(len(self._queue))

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refused.labels(reason).inc()

    def _release(self, req: _Request) -> None:
        """The request is over for the client: make sure the workers let go of it too."""
        self.requests.pop(req.id, None)
        self._by_key.pop(req.key, None)
        req.done = True
        self._leave_queue(req)
        self._end_attempt(req)
        self._room_may_have_appeared()

    def _end_attempt(self, req: _Request) -> None:
        """Whatever is still live of the current attempt on a (live) worker is aborted there."""
        targets = []
        if req.decode is not None:
            req.decode.requests.discard(req.key)
            if not req.worker_finished and req.decode.state is not WorkerState.DEAD:
                targets.append(req.decode)
        if req.prefill_task is not None and not req.prefill_task.done() and req.prefill.state is not WorkerState.DEAD:
            targets.append(req.prefill)
        if targets:
            self._spawn(self._abort_on(req.key, targets))
        req.decode = req.prefill = req.prefill_task = req.destination = None
        req.worker_finished = False

    async def _abort_on(self, key: str, workers: list[WorkerRecord]) -> None:
        """Abort on every worker at once (one slow worker must not hold up the others' blocks)."""
        pairs = [(w.id, key) for w in workers]
        self._aborting.update(pairs)
        try:
            results = await asyncio.gather(*(self._call(w, "abort", key) for w in workers), return_exceptions=True)
        finally:
            self._aborting.difference_update(pairs)
        for worker, pair, result in zip(workers, pairs, results):
            if isinstance(result, BaseException):  # a dead worker has freed everything anyway
                logger.info("abort of %s on %s: %s", key, worker.id, _describe(result))
                continue
            self._aborted[pair] = None
            if len(self._aborted) > _ABORTS_REMEMBERED:
                del self._aborted[next(iter(self._aborted))]

    async def _wait_for_events(self, req: _Request, timeout: float) -> None:
        """Until an event is posted, or `timeout` seconds without one. One watchdog keeps every
        stream's timeout (_watch_stalls): a stream waits once per step, and a timer per wait
        (asyncio.wait_for's) was a cost per streamed token."""
        loop = asyncio.get_running_loop()
        req.waiter = loop.create_future()
        req.stall_deadline, req.stall_timeout = loop.time() + timeout, timeout
        if self._stall_watchdog is None:
            self._stall_watchdog = self._spawn(self._watch_stalls())
        try:
            await req.waiter
        finally:
            req.waiter = None

    async def _watch_stalls(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_STALL_CHECK_INTERVAL)
            now = loop.time()
            for req in list(self.requests.values()):
                if req.waiter is not None and not req.waiter.done() and req.stall_deadline <= now:
                    message = f"no progress on the request for {req.stall_timeout:.0f}s"
                    if req.decode is not None:  # its worker answers but makes no progress (a hung step): the request moves
                        self._lose(req, req.key, "stalled", f"{message} on {req.decode.id}")
                    else:
                        req.waiter.set_exception(RequestError("UNAVAILABLE", message))

    def _post(self, req: _Request, event) -> None:
        if not req.done:
            req.events.append(event)
            if req.waiter is not None and not req.waiter.done():
                req.waiter.set_result(None)

    def _lose(self, req: _Request, key: str, reason: str, message: str) -> None:
        self._post(req, _Lost(key, reason, message))

    def _new_key(self, request_id: str) -> str:
        return f"{request_id}#{uuid.uuid4().hex[:12]}"

    # --- watching workers -------------------------------------------------------------------------

    async def _watch(self, worker: WorkerRecord) -> None:
        """A prefill worker is called only when it has work: check now and then that it is alive,
        so a dead one leaves the pool (and health) before a request is sent to it, and a frozen
        one gives its prompts back."""
        loop = asyncio.get_running_loop()
        answered = loop.time()
        while worker.id in self.workers and worker.state is not WorkerState.DEAD:
            await asyncio.sleep(self.config.liveness_interval)
            if worker.id not in self.workers:
                return
            if worker.state is WorkerState.STARTING:
                answered = loop.time()
                continue  # the cluster waits for it to be ready, and handles a failed start
            try:
                await self._ping(worker)
                answered = loop.time()
            except Exception:  # noqa: BLE001, S110 - slow: not gone unless it stays so
                self._unless_unresponsive(worker, loop.time() - answered)

    async def _ping(self, worker: WorkerRecord) -> None:
        """Ask the worker how its engine is: gone, or its engine failed (_engine_failure), it dies
        here; no answer within _unanswered_wait raises."""
        try:
            health = await self._call(worker, "ping", timeout=self._unanswered_wait)
        except _WorkerGone as e:
            self._worker_died(worker, e)
            return
        if (failure := self._engine_failure(worker, health)) is not None:
            self._worker_died(worker, failure)

    def _engine_failure(self, worker: WorkerRecord, health: dict) -> Exception | None:
        """Why a worker that answers cannot serve, from its engine's health (EngineLoop.health): the
        engine thread has stopped, or one step has run for longer than a request waits on the
        worker (a hung step, a GPU hang: its requests move at stall_timeout anyway, and the worker
        would be chosen again and again)."""
        if not health["alive"]:
            return RuntimeError("its engine has stopped")
        c = self.config  # as long as a request waits on such a worker: a colocated one's first token may take the prefill's time
        longest = {Role.PREFILL: c.prefill_timeout, Role.COLOCATED: max(c.prefill_timeout, c.stall_timeout)}.get(worker.role, c.stall_timeout)
        if health["step_seconds"] >= longest:
            return TimeoutError(f"one step of its engine has run for {health['step_seconds']:.0f}s (hung)")
        return None

    @property
    def _unanswered_wait(self) -> float:
        """How long one call to a worker's event loop is waited for, so that an unresponsive one is
        found within unresponsive_after (and a healthy one, which answers within poll_timeout, is not)."""
        return min(self.config.call_timeout, max(self.config.unresponsive_after / 2, self.config.poll_timeout * 2))

    def _unless_unresponsive(self, worker: WorkerRecord, silent: float) -> None:
        if worker.state is not WorkerState.STARTING and silent >= self.config.unresponsive_after:
            self._worker_died(worker, TimeoutError(f"its actor has answered nothing for {silent:.0f}s (frozen, or its host hung)"))

    async def _poll(self, worker: WorkerRecord) -> None:
        """Long-poll one decode (or colocated) worker for the new tokens of all its sequences."""
        call = None
        loop = asyncio.get_running_loop()
        answered = loop.time()
        while worker.id in self.workers and worker.state is not WorkerState.DEAD:
            try:
                # A call that times out (e.g. queued while the actor is still starting) is waited
                # for again, never replaced: the worker would run the abandoned call as well, and
                # whichever poll woke first would take the outbox, so the outputs of a step (a
                # request's first tokens) could go to an answer nobody reads.
                if call is None:
                    call = asyncio.ensure_future(worker.handle.get_outputs.remote(self.config.poll_timeout))
                    # This task may be cancelled (shutdown, the worker removed) with the call in
                    # flight: its failure, say ActorDiedError from the kill, must not go unread.
                    call.add_done_callback(lambda f: f.cancelled() or f.exception())
                result = await asyncio.wait_for(asyncio.shield(call), self._unanswered_wait)
                call, answered = None, loop.time()
            except asyncio.TimeoutError:
                if worker.state is WorkerState.STARTING:
                    answered = loop.time()  # a starting actor answers once its constructor is done
                self._unless_unresponsive(worker, loop.time() - answered)
                continue
            except Exception as e:  # noqa: BLE001
                self._worker_died(worker, e)
                return
            load = result["load"]
            if (failure := self._engine_failure(worker, load)) is not None:
                self._worker_died(worker, failure)
                return
            self._apply_load(worker, load)
            step_time = result.get("step_time", 0.0)
            strays = []
            for key, tokens, finish_reason, error, logprobs, prompt_logprobs in result["outputs"]:
                req = self._by_key.get(key)
                if req is None or req.decode is not worker:
                    if finish_reason is None and error is None:
                        strays.append(key)
                    continue
                if error is not None:
                    req.worker_finished = True  # the worker has already let go of it
                    self._lose(req, key, "transfer_failed", f"decode worker {worker.id}: {error}")
                else:
                    self._post(req, _Tokens(key, tokens, finish_reason, logprobs, step_time, prompt_logprobs))
            if strays:
                self._abort_strays(worker, strays)

    def _abort_strays(self, worker: WorkerRecord, keys: list[str]) -> None:
        """Tokens of attempts the router has let go of (ended, moved, timed out) and has no abort
        of in flight or through: the one it sent failed (the worker's call slots full, a timeout),
        and the sequence would decode on there, holding its blocks, to max_tokens. Abort it again."""
        for key in keys:
            if (worker.id, key) not in self._aborting and (worker.id, key) not in self._aborted:
                self._aborting.add((worker.id, key))  # now: a second poll's tokens for it must not send another
                self._spawn(self._abort_on(key, [worker]))

    def _apply_load(self, worker: WorkerRecord, load: dict) -> None:
        """A newer load report replaces the older; room that appears wakes the admission queue."""
        if load["serial"] <= worker.load_serial:
            return  # answers may overtake one another: never go back to an older picture
        roomier = load["free_blocks"] > worker.free_blocks or load["running"] < worker.running
        worker.load_serial, worker.free_blocks, worker.running = load["serial"], load["free_blocks"], load["running"]
        if roomier:
            self._room_may_have_appeared()

    def _worker_died(self, worker: WorkerRecord, error: BaseException) -> None:
        if worker.state is WorkerState.DEAD:
            return
        logger.warning("%s worker %s is gone: %s", worker.role.value, worker.id, _describe(error))
        worker.state = WorkerState.DEAD
        if (death := self._deaths.get(worker.id)) is not None:
            death.set()  # its calls in flight give up now
        self._lose_requests_on(worker, f"{worker.role.value}_died", f"{worker.role.value} worker {worker.id} died")
        self._on_workers_changed()
        for sibling in self.workers.values():  # its node may be gone with it
            if worker.node_id and sibling.node_id == worker.node_id and sibling.takes_work:
                sibling.checking = True
                self._spawn(self._check(sibling))

    async def _check(self, worker: WorkerRecord) -> None:
        """A worker whose node lost another is asked at once whether it is alive (Ray knows the
        actors of a lost node dead): dead, it goes now, before a moved request is sent to it."""
        try:
            await self._ping(worker)
        except Exception:  # noqa: BLE001, S110 - slow, not gone: the liveness checks go on as before
            pass
        finally:
            worker.checking = False
            self._room_may_have_appeared()  # the head of the admission queue may take it now

    def _lose_requests_on(self, worker: WorkerRecord, reason: str, message: str) -> None:
        for key in list(worker.requests):
            req = self._by_key.get(key)
            if req is not None:
                self._lose(req, key, reason, message)

    # --- status ----------------------------------------------------------------------------------

    async def worker_stats(self) -> list[dict]:
        async def one(worker: WorkerRecord) -> dict:
            base = {"id": worker.id, "role": worker.role.value, "state": worker.state.value, "node": worker.node,
                    "node_id": worker.node_id, "node_address": worker.address, "pid": worker.pid,
                    "queued_tokens": worker.queued_tokens, "max_num_seqs": worker.max_num_seqs}  # fmt: skip
            if worker.state is WorkerState.DEAD:
                return base
            try:
                stats = await self._call(worker, "stats", timeout=5.0)
            except Exception as e:  # noqa: BLE001
                return {**base, "error": _describe(e)}
            return {**stats, **base}

        return list(await asyncio.gather(*(one(w) for w in list(self.workers.values()))))

    async def refresh_metrics(self, every: float = 2.0) -> None:
        """Keep the metrics' view of the workers fresh (their gauges are read at scrape time)."""
        while True:
            self.metrics.workers = await self.worker_stats()
            await asyncio.sleep(every)

    # --- plumbing --------------------------------------------------------------------------------

    async def _call(self, worker: WorkerRecord, method: str, *args, timeout: float | None = None):
        """A control call to a worker, bounded in time (asyncio.TimeoutError, the wait for a free
        slot included) and in number per worker; a dead worker becomes _WorkerGone."""
        slots = self._slots.get(worker.id) or asyncio.Semaphore(self.config.max_calls_per_worker)
        if worker.id in self.workers:  # not for the last calls to a removed worker (its aborts): it would stay
            self._slots.setdefault(worker.id, slots)

        async def call():
            async with slots:
                return await getattr(worker.handle, method).remote(*args)

        try:
            return await asyncio.wait_for(self._unless_declared_dead(worker, call()), timeout or self.config.call_timeout)
        except asyncio.TimeoutError:
            raise
        except Exception as e:
            if _is_worker_death(e):
                raise _WorkerGone(_describe(e)) from None
            raise

    async def _unless_declared_dead(self, worker: WorkerRecord, call):
        """`call`'s answer, or _WorkerGone as soon as the worker is declared dead (found gone by
        another call, or silent for unresponsive_after): a frozen worker answers nothing, and a
        reservation asked of it must not hold its request for the whole call_timeout."""
        death = self._deaths.get(worker.id)
        if death is None or death.is_set():  # the last calls to a removed or dead worker (its aborts)
            return await call
        answer = await unless_first(death.wait(), call)
        if answer.cancelled():
            raise _WorkerGone(f"{worker.role.value} worker {worker.id} was declared dead while the call was out")
        return answer.result()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def unless_first(interrupt, work) -> asyncio.Future:
    """Run `work` until it ends or `interrupt` (an awaitable) does, whichever is first; the
    other is cancelled (the work awaited to its end). The work's future: done, or cancelled if
    the interrupt came first."""
    done, stop = asyncio.ensure_future(work), asyncio.ensure_future(interrupt)
    try:
        await asyncio.wait({done, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not done.done():
            done.cancel()
            await asyncio.gather(done, return_exceptions=True)
    return done


def _next_event(events: collections.deque):
    """The first event; if it is tokens, together with the tokens of the same attempt right behind
    it (a stream the router is behind on gets one chunk for several steps, not a chunk per step)."""
    event = events.popleft()
    if not isinstance(event, _Tokens) or event.finish_reason is not None:
        return event
    while events and isinstance(events[0], _Tokens) and events[0].key == event.key:
        more = events.popleft()
        logprobs = event.logprobs + more.logprobs if event.logprobs is not None and more.logprobs is not None else None
        event = _Tokens(event.key, event.token_ids + more.token_ids, more.finish_reason, logprobs, event.step_time,
                        event.prompt_logprobs or more.prompt_logprobs)  # fmt: skip
        if more.finish_reason is not None:
            break
    return event


def _joined(held: Chunk | None, chunk: Chunk) -> Chunk:
    """What was held back and the chunk after it, as one chunk."""
    if held is None:
        return chunk
    logprobs = held.logprobs + chunk.logprobs if held.logprobs is not None and chunk.logprobs is not None else None
    return Chunk(held.token_ids + chunk.token_ids, held.text + chunk.text, chunk.finish_reason, logprobs, chunk.timeline,
                 held.step_time or chunk.step_time, stop_reason=chunk.stop_reason)  # fmt: skip


def _stop_reason(req: _Request, finish_reason: str) -> str | int | None:
    """What ended a request that stopped: its stop string, or its last token if that is one of its
    stop token ids; None for EOS (as vLLM reports them)."""
    if finish_reason != "stop":
        return None
    if req.detokenizer is not None and req.detokenizer.stop_string is not None:
        return req.detokenizer.stop_string
    last = req.output_ids[-1] if req.output_ids else None
    return last if last in req.params.stop_token_ids else None


class _WorkerGone(Exception):
    """A worker's actor (or its engine loop) is gone."""


def _is_worker_death(e: BaseException) -> bool:
    """The worker is gone: its actor died, or its engine loop did (a worker that cannot serve)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    cause = getattr(e, "cause", None)
    return isinstance(e, (RayActorError, ActorDiedError, ActorUnavailableError, _WorkerGone, EngineStopped)) or isinstance(
        cause, EngineStopped
    )


def _describe(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # RayTaskError wraps the worker's own exception
    e = cause if isinstance(cause, BaseException) else e
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"

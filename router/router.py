"""The life of a request in the router (disaggregated mode):

  admit     pick a decode worker D (most free KV blocks, fewest running) and reserve blocks for
            the prompt there; if every D refuses, wait for capacity and retry until
            admission_timeout, then RESOURCE_EXHAUSTED
  prefill   pick a prefill worker P (longest cached prefix unless that one is overloaded, then
            fewest queued tokens) and ask it to compute the prompt and ship the KV and first
            token into D's reservation (a background task)
  stream    D's new tokens arrive through the router's long poll of D (all of D's sequences,
            once per step); each is detokenized, stop strings are applied, and the delta goes
            to the client
  finish    D reports stop/length, or a stop string hits here, or the client cancels, calls
            Abort, or its deadline passes: whatever is still live on P or D is aborted there,
            so both free their blocks

In colocated mode a request goes whole to one worker, which does both phases.
Every wait is bounded: admission, each control call, the prefill, and the gap between tokens.
A worker that dies fails its requests with UNAVAILABLE; nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.detokenizer import IncrementalDetokenizer
from engine.engine_loop import EngineStopped
from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams
from router import policy
from router.metrics import Metrics
from router.window import RequestWindow
from router.workers import Role, WorkerRecord, WorkerState

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """Ends a request with a gRPC status code (by name) and a message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RouterConfig:
    mode: str = "disaggregated"  # or "colocated"
    admission_timeout: float = 60.0  # waiting for KV blocks before RESOURCE_EXHAUSTED
    call_timeout: float = 30.0  # one control call to a worker
    prefill_timeout: float = 600.0  # prompt computed and its KV delivered
    stall_timeout: float = 300.0  # longest gap between two events of a live request
    poll_timeout: float = 1.0  # the decode workers' long poll
    liveness_interval: float = 2.0  # how often an idle prefill worker is checked
    balance: policy.Balance = field(default_factory=policy.Balance)  # cache affinity vs load, prefill routing


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asked


@dataclass
class _Failure:
    code: str
    message: str


@dataclass
class _Tokens:
    token_ids: list[int]
    finish_reason: str | None
    from_worker: bool  # False: the router's own Abort
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class _Request:
    id: str  # the client's
    key: str  # unique to this request: what workers know it by (clients may reuse ids)
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    owner: str = ""  # who made it (router.auth): only they may abort it
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    decode: WorkerRecord | None = None  # the decode/colocated worker, from the moment it is asked
    destination: dict | None = None  # D's reservation: its receiver's address and the block ids
    prefill: WorkerRecord | None = None
    prefill_task: asyncio.Task | None = None
    worker_finished: bool = False  # the decode/colocated worker reported its end
    aborted: bool = False  # Abort was called: stop trying to place it
    done: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    last_token: float | None = None  # when the latest tokens were streamed
    streamed: int = 0  # tokens streamed to the client


class Router:
    def __init__(
        self, tokenizer, block_size: int, config: RouterConfig = RouterConfig(),
        on_workers_changed: Callable[[], None] = lambda: None, metrics: Metrics | None = None,
    ):  # fmt: skip
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        self.prefix_index = policy.PrefixIndex(block_size)
        self.workers: dict[str, WorkerRecord] = {}
        self.requests: dict[str, _Request] = {}  # live requests by client id
        self._by_key: dict[str, _Request] = {}  # the same, by worker-side key
        self._on_workers_changed = on_workers_changed
        self._tasks: set[asyncio.Task] = set()
        self._capacity = asyncio.Event()  # set when a request leaves a worker
        self.window: RequestWindow | None = None  # the autoscaler's, when one runs

    # --- workers ---------------------------------------------------------------------------------

    def add_worker(self, worker: WorkerRecord) -> None:
        self.workers[worker.id] = worker
        self._spawn(self._watch(worker) if worker.role is Role.PREFILL else self._poll(worker))
        self._on_workers_changed()

    def set_state(self, worker_id: str, state: WorkerState) -> None:
        self.workers[worker_id].state = state
        self._on_workers_changed()

    def remove_worker(self, worker_id: str) -> None:
        worker = self.workers.pop(worker_id, None)
        self.prefix_index.forget(worker_id)
        if worker is not None:
            self._fail_requests_on(worker, f"{worker.role.value} worker {worker.id} was removed")
        self._on_workers_changed()

    def of_role(self, role: Role) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.role is role]

    def serving(self) -> bool:
        ready = {w.role for w in self.workers.values() if w.takes_work}
        if self.config.mode == "colocated":
            return Role.COLOCATED in ready
        return {Role.PREFILL, Role.DECODE} <= ready

    # --- requests --------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, owner: str = ""
    ) -> AsyncIterator[Chunk]:
        """The request's chunks, as they come. `owner` (router.auth's caller id) alone may abort it."""
        if request_id in self.requests:
            raise RequestError("INVALID_ARGUMENT", f"request id {request_id!r} is already in use")
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop) if self.tokenizer else None
        req = _Request(request_id, f"{request_id}#{uuid.uuid4().hex[:12]}", prompt_token_ids, params, detok, owner)
        self.requests[request_id] = self._by_key[req.key] = req
        if self.window is not None:
            self.window.arrived(len(prompt_token_ids))
        try:
            if self.config.mode == "colocated":
                await self._submit_colocated(req)
            else:
                await self._admit(req)
                if not req.aborted:
                    self._start_prefill(req)
            async for chunk in self._stream(req):
                yield chunk
        except RequestError as e:
            if e.code == "RESOURCE_EXHAUSTED" and self.window is not None:
                self.window.refused()
            raise
        finally:
            self._release(req)

    def abort(self, request_id: str, owner: str = "") -> bool:
        req = self.requests.get(request_id)
        if req is None or req.owner != owner:
            return False
        req.aborted = True
        req.events.put_nowait(_Tokens([], "abort", from_worker=False))
        self._capacity.set()  # wakes it if it waits for KV room
        return True

    async def _submit_colocated(self, req: _Request) -> None:
        for worker in policy.decode_order(self.of_role(Role.COLOCATED)):
            if req.aborted:
                return
            answered, _ = await self._ask(req, worker, worker.handle.submit.remote(req.key, req.prompt_token_ids, asdict(req.params)))
            if answered:
                return
        raise RequestError("UNAVAILABLE", "no worker is ready to take requests")

    async def _ask(self, req: _Request, worker: WorkerRecord, ref) -> tuple[bool, Any]:
        """Await a call that may leave `req` on decode/colocated `worker` (a reservation, or the
        request itself). The request is the worker's while the call is out: outputs that come
        before the answer are taken, a cancel aborts it there, and a draining worker waits for
        it. (False, None), and the request unbound, if the worker is gone or did not answer in
        time (then it is told to drop whatever it may have taken)."""
        self._bind(req, worker)
        try:
            return True, await self._call(ref)
        except _WorkerGone as e:
            self._unbind(req)
            self._worker_died(worker, e)
        except asyncio.TimeoutError:
            self._unbind(req)
            self._spawn(self._abort_on(req.key, [worker]))
        return False, None

    def _bind(self, req: _Request, worker: WorkerRecord) -> None:
        req.decode = worker
        worker.requests.add(req.key)

    def _unbind(self, req: _Request) -> None:
        req.decode.requests.discard(req.key)
        req.decode = None

    async def _admit(self, req: _Request) -> None:
        """Reserve KV blocks on a decode worker, waiting for capacity up to admission_timeout."""
        deadline = time.monotonic() + self.config.admission_timeout
        params = asdict(req.params)
        while not req.aborted:
            candidates = policy.decode_order(self.of_role(Role.DECODE))
            if not candidates:
                raise RequestError("UNAVAILABLE", "no decode worker is ready to take requests")
            for worker in candidates:
                if req.aborted:
                    return
                _, dest = await self._ask(req, worker, worker.handle.reserve.remote(req.key, req.prompt_token_ids, params))
                if dest is not None:
                    req.destination = dest
                    return
                if req.decode is worker:  # refused
                    self._unbind(req)
            if time.monotonic() >= deadline:
                raise RequestError(
                    "RESOURCE_EXHAUSTED",
                    f"no decode worker could reserve KV blocks for {len(req.prompt_token_ids)} prompt tokens "
                    f"within {self.config.admission_timeout:.0f}s",
                )
            self._capacity.clear()
            try:
                await asyncio.wait_for(self._capacity.wait(), timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                pass

    def _start_prefill(self, req: _Request) -> None:
        hashes = self.prefix_index.hashes(req.prompt_token_ids)
        worker = policy.choose_prefill(self.of_role(Role.PREFILL), hashes, self.prefix_index, self.config.balance)
        if worker is None:
            raise RequestError("UNAVAILABLE", "no prefill worker is ready to take requests")
        self.prefix_index.set_capacity(worker.id, worker.total_blocks or len(hashes))
        self.prefix_index.record(worker.id, hashes)
        req.prefill = worker
        worker.requests.add(req.key)
        worker.queued_tokens += len(req.prompt_token_ids)
        req.prefill_task = self._spawn(self._prefill(req, worker))

    async def _prefill(self, req: _Request, worker: WorkerRecord) -> None:
        try:
            call = worker.handle.prefill.remote(req.key, req.prompt_token_ids, asdict(req.params), req.destination)
            await asyncio.wait_for(call, self.config.prefill_timeout)
        except asyncio.TimeoutError:
            self._spawn(self._abort_on(req.key, [worker]))
            self._fail(req, "UNAVAILABLE", f"prefill did not finish within {self.config.prefill_timeout:.0f}s")
        except Exception as e:  # noqa: BLE001 - a worker error, its death, a failed transfer
            if _is_worker_death(e):
                self._worker_died(worker, e)
            self._fail(req, "UNAVAILABLE", f"prefill on {worker.id} failed: {_describe(e)}")
        finally:
            worker.queued_tokens -= len(req.prompt_token_ids)
            worker.requests.discard(req.key)

    async def _stream(self, req: _Request) -> AsyncIterator[Chunk]:
        timeout = max(self.config.prefill_timeout, self.config.stall_timeout)  # the first event follows the prefill
        while True:
            try:
                event = await asyncio.wait_for(req.events.get(), timeout)
            except asyncio.TimeoutError:
                raise RequestError("UNAVAILABLE", f"no progress on the request for {timeout:.0f}s") from None
            timeout = self.config.stall_timeout
            if isinstance(event, _Failure):
                raise RequestError(event.code, event.message)
            tokens, finish_reason, logprobs = event.token_ids, event.finish_reason, event.logprobs
            req.worker_finished |= event.from_worker and finish_reason is not None
            text = ""
            if req.detokenizer is not None:
                consumed = req.detokenizer.add_tokens(tokens)
                if req.detokenizer.stopped:
                    tokens, finish_reason = tokens[:consumed], "stop"
                    logprobs = logprobs[:consumed] if logprobs is not None else None
                text = req.detokenizer.take_delta(finished=finish_reason is not None)
            self._observe(req, len(tokens), finish_reason is not None)
            yield Chunk(tokens, text, finish_reason, logprobs)
            if finish_reason is not None:
                return

    def _observe(self, req: _Request, streamed_tokens: int, finished: bool) -> None:
        """TTFT, ITL and E2E into the metrics (labelled with the decode worker) and the autoscaler's window."""
        now = time.perf_counter()
        labels = (req.decode.role.value, req.decode.id) if self.metrics is not None and req.decode is not None else None
        if streamed_tokens:
            first = req.last_token is None
            seconds = now - (req.arrival if first else req.last_token)
            if labels is not None:
                (self.metrics.ttft if first else self.metrics.itl).labels(*labels).observe(seconds)
            if self.window is not None:
                (self.window.first_token if first else self.window.gap)(seconds)
            req.last_token = now
            req.streamed += streamed_tokens
        if finished:
            if labels is not None and req.last_token is not None:
                self.metrics.e2e.labels(*labels).observe(req.last_token - req.arrival)
            if self.window is not None:
                self.window.finished(req.streamed)

    def _release(self, req: _Request) -> None:
        """The request is over for the client: make sure the workers let go of it too."""
        self.requests.pop(req.id, None)
        self._by_key.pop(req.key, None)
        req.done = True
        targets = []
        if req.decode is not None:
            req.decode.requests.discard(req.key)
            if not req.worker_finished:
                targets.append(req.decode)
        if req.prefill_task is not None and not req.prefill_task.done():
            targets.append(req.prefill)
        if targets:
            self._spawn(self._abort_on(req.key, targets))
        self._capacity.set()

    async def _abort_on(self, request_id: str, workers: list[WorkerRecord]) -> None:
        """Abort on every worker at once (one slow worker must not hold up the others' blocks)."""
        results = await asyncio.gather(*(self._call(w.handle.abort.remote(request_id)) for w in workers), return_exceptions=True)
        for worker, result in zip(workers, results):
            if isinstance(result, BaseException):  # a dead worker has freed everything anyway
                logger.info("abort of %s on %s: %s", request_id, worker.id, _describe(result))

    def _fail(self, req: _Request, code: str, message: str) -> None:
        if not req.done:
            req.events.put_nowait(_Failure(code, message))

    # --- watching workers -------------------------------------------------------------------------

    async def _watch(self, worker: WorkerRecord) -> None:
        """A prefill worker is called only when it has work: check now and then that it is alive,
        so a dead one leaves the pool (and health) before a request is sent to it."""
        while worker.id in self.workers and worker.state is not WorkerState.DEAD:
            await asyncio.sleep(self.config.liveness_interval)
            if worker.state is WorkerState.STARTING:
                continue  # the cluster waits for it to be ready, and handles a failed start
            try:
                await self._call(worker.handle.stats.remote())
            except _WorkerGone as e:
                self._worker_died(worker, e)
            except Exception:  # noqa: BLE001, S110 - busy in a long step, or slow: not gone
                pass

    async def _poll(self, worker: WorkerRecord) -> None:
        """Long-poll one decode (or colocated) worker for the new tokens of all its sequences."""
        while worker.id in self.workers and worker.state is not WorkerState.DEAD:
            try:
                call = worker.handle.get_outputs.remote(self.config.poll_timeout)
                result = await asyncio.wait_for(call, self.config.call_timeout)
            except asyncio.TimeoutError:
                continue
            except Exception as e:  # noqa: BLE001
                self._worker_died(worker, e)
                return
            load = result["load"]
            worker.free_blocks, worker.running = load["free_blocks"], load["running"]
            if not load["alive"]:
                self._worker_died(worker, RuntimeError("its engine loop stopped"))
                return
            for key, tokens, finish_reason, error, logprobs in result["outputs"]:
                req = self._by_key.get(key)
                if req is None or req.decode is not worker:
                    continue
                if error is not None:
                    req.worker_finished = True  # the worker has already let go of it
                    self._fail(req, "UNAVAILABLE", error)
                else:
                    req.events.put_nowait(_Tokens(tokens, finish_reason, True, logprobs))
                if finish_reason is not None:
                    self._capacity.set()

    def _worker_died(self, worker: WorkerRecord, error: BaseException) -> None:
        if worker.state is WorkerState.DEAD:
            return
        logger.warning("%s worker %s is gone: %s", worker.role.value, worker.id, _describe(error))
        worker.state = WorkerState.DEAD
        self._fail_requests_on(worker, f"{worker.role.value} worker {worker.id} died")
        self._on_workers_changed()

    def _fail_requests_on(self, worker: WorkerRecord, message: str) -> None:
        for key in list(worker.requests):
            req = self._by_key.get(key)
            if req is not None:
                self._fail(req, "UNAVAILABLE", message)

    # --- status ----------------------------------------------------------------------------------

    async def worker_stats(self) -> list[dict]:
        async def one(worker: WorkerRecord) -> dict:
            base = {"id": worker.id, "role": worker.role.value, "state": worker.state.value, "node": worker.node,
                    "queued_tokens": worker.queued_tokens}  # fmt: skip
            if worker.state is WorkerState.DEAD:
                return base
            try:
                stats = await self._call(worker.handle.stats.remote(), timeout=5.0)
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

    async def _call(self, ref, timeout: float | None = None):
        """Await a Ray call, bounded (asyncio.TimeoutError); a dead worker becomes _WorkerGone."""
        try:
            return await asyncio.wait_for(ref, timeout or self.config.call_timeout)
        except asyncio.TimeoutError:
            raise
        except Exception as e:
            if _is_worker_death(e):
                raise _WorkerGone(_describe(e)) from None
            raise

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


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

"""An LLMEngine on a thread of its own, for callers on other threads (the workers' event loops,
KV-transfer threads).

The engine is not thread-safe, so nothing else touches it: callers hand functions to `call`,
which run on the engine thread between steps, in order, and answer through a Future. Steps run
back to back while the engine has work; when it has none the thread sleeps until a command
comes. Once it has been quiet (no work, no command) for `idle_check_after` seconds, it checks
that every KV block is free, cached or owned by a live request: the check walks the whole pool
in Python (3.5 ms at 28k blocks, 21 ms at 200k) holding the GIL, so run as soon as the engine
went idle it delayed the KV transfer a prefill had just queued (the sender's thread waited for
it) and any request arriving meanwhile.
`on_outputs` gets every step's outputs (on the engine thread: keep it short).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from engine.llm_engine import LLMEngine, PrefillLayerHook
from engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

_STOP = object()
_STALL_WAIT = 0.01  # seconds: work waiting but nothing schedulable (e.g. blocks held for acks)
IDLE_CHECK_AFTER = 1.0  # seconds of quiet before the idle-time invariant check


class EngineStopped(RuntimeError):
    """The engine loop is gone (a step failed, or it was stopped): the worker cannot serve."""


class EarlyAborts:
    """Request ids aborted before they arrived. Calls to a worker may overtake one another (Ray
    runs an async actor's calls out of order when one waits for a large argument, such as a long
    prompt, in its object store), so an abort that finds nothing is remembered, and the call it
    was meant for, arriving later, takes nothing. Ids are never reused (each attempt has its own
    key); the last `keep` are remembered. Engine thread only."""

    def __init__(self, keep: int = 10_000):
        self.keep = keep
        self._ids: dict[str, None] = {}  # insertion order: the oldest is dropped first

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        if len(self._ids) > self.keep:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_layer: PrefillLayerHook | None = None,
        on_stop: Callable[[BaseException | None], None] = lambda error: None,
        name: str = "engine",
        idle_check_after: float = IDLE_CHECK_AFTER,
    ):
        self.engine = engine
        self.on_outputs = on_outputs
        self.on_layer = on_layer
        self.on_stop = on_stop  # called on the engine thread as the loop ends, with the error if any
        self.error: BaseException | None = None  # set if a step failed: the loop has stopped
        self.invariant_violations = 0
        self.idle_check_after = idle_check_after
        self._check_due = False  # steps have run since the last idle-time check
        self._last_active = 0.0  # time.monotonic() of the last step or command
        self._stalled = False  # the last step found nothing it could schedule
        self._step_started = 0.0  # time.monotonic() when the step now running began; 0.0 between steps
        self._stopped = False
        self._lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable, *args, **kwargs) -> Future:
        """Run fn(*args, **kwargs) on the engine thread; the Future holds its result or error
        (EngineStopped once the loop is gone)."""
        future: Future = Future()
        with self._lock:  # atomic with the final drain: a command is either run or refused
            if self._stopped:
                future.set_exception(self._stopped_error())
            else:
                self._commands.put((fn, args, kwargs, future))
        return future

    def stop(self, timeout: float = 10.0) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def health(self) -> dict:
        """Whether the engine thread runs, and how long the step now running has run (0.0 between
        steps): read off that thread, so a hung step (a GPU hang) shows while the actor answers."""
        started = self._step_started
        return {"alive": self.alive, "step_seconds": time.monotonic() - started if started else 0.0}

    def _run(self) -> None:
        try:
            while self._run_commands(self._command_wait()):
                if self.engine.has_unfinished_requests():
                    steps = self.engine.scheduler.stats.steps
                    self._step_started = time.monotonic()
                    outputs = self.engine.step(self.on_layer)
                    self._step_started = 0.0
                    self._stalled = self.engine.scheduler.stats.steps == steps
                    self._check_due, self._last_active = True, time.monotonic()
                    if outputs:
                        self.on_outputs(outputs)
                elif self._check_due and self._quiet_left() <= 0:
                    self._check_invariants()
        except BaseException as e:  # a failed step leaves the engine in an unknown state: stop, loudly
            logger.exception("engine loop failed")
            self.error = e
        try:
            self.on_stop(self.error)
        finally:
            with self._lock:
                self._stopped = True
                self._fail_pending()

    def _command_wait(self) -> float | None:
        """How long to wait for a command before the next step: when idle, until the idle-time
        check is due (forever once it has run), a moment when the last step could schedule
        nothing (rather than spin), not at all otherwise."""
        if not self.engine.has_unfinished_requests():
            return max(self._quiet_left(), 1e-3) if self._check_due else None
        return _STALL_WAIT if self._stalled else 0.0

    def _quiet_left(self) -> float:
        return self._last_active + self.idle_check_after - time.monotonic()

    def _check_invariants(self) -> None:
        """Idle and quiet: every KV block is free, cached or owned by a live request."""
        self._check_due = False
        try:
            self.engine.check_invariants()
        except AssertionError as e:
            self.invariant_violations += 1
            logger.error("KV block bookkeeping is inconsistent: %s", e)

    def _run_commands(self, wait: float | None) -> bool:
        """Run every queued command, first waiting up to `wait` seconds for one (None: until one
        comes). False once told to stop."""
        try:
            item = self._commands.get(timeout=wait) if wait != 0.0 else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            self._last_active = time.monotonic()
            fn, args, kwargs, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    future.set_exception(e)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _stopped_error(self) -> EngineStopped:
        return EngineStopped(f"engine loop stopped: {self.error!r}" if self.error else "engine loop stopped")

    def _fail_pending(self) -> None:
        error = self._stopped_error()
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[3].set_running_or_notify_cancel():
                item[3].set_exception(error)

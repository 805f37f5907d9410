"""An LLMEngine on a thread of its own, for callers on other threads (the workers' event loops,
KV-transfer threads).

The engine is not thread-safe, so nothing else touches it: callers hand functions to `call`,
which run on the engine thread between steps, in order, and answer through a Future. Steps run
back to back while the engine has work; when it has none the thread sleeps until a command
comes. `on_outputs` gets every step's outputs (on the engine thread: keep it short).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from engine.llm_engine import LLMEngine, PrefillLayerHook
from engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

_STOP = object()


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_layer: PrefillLayerHook | None = None,
        name: str = "engine",
    ):
        self.engine = engine
        self.on_outputs = on_outputs
        self.on_layer = on_layer
        self.error: BaseException | None = None  # set if a step failed: the loop has stopped
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable, *args, **kwargs) -> Future:
        """Run fn(*args, **kwargs) on the engine thread; the Future holds its result or error."""
        future: Future = Future()
        if self.error is not None:
            future.set_exception(RuntimeError(f"engine loop stopped: {self.error!r}"))
        else:
            self._commands.put((fn, args, kwargs, future))
        return future

    def stop(self, timeout: float = 10.0) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            while self._run_commands(wait=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step(self.on_layer)
                    if outputs:
                        self.on_outputs(outputs)
        except BaseException as e:  # a failed step leaves the engine in an unknown state: stop, loudly
            logger.exception("engine loop failed")
            self.error = e
        self._fail_pending()

    def _run_commands(self, wait: bool) -> bool:
        """Run every queued command (first waiting for one if `wait`). False once told to stop."""
        try:
            item = self._commands.get() if wait else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
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

    def _fail_pending(self) -> None:
        error = RuntimeError(f"engine loop stopped: {self.error!r}" if self.error else "engine loop stopped")
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[3].set_running_or_notify_cancel():
                item[3].set_exception(error)

"""The decode worker: an engine in decode mode running continuous batching, plus a KV receiver.
Made a Ray actor by cluster/; the logic lives in engine/ and kv_transfer/.

A request's stages here:

  reserve    the router asks for blocks for the prompt; refused (no block ids) if the pool would
             be too short for the running sequences to grow. The blocks belong to the request
             from now on. A request resumed here after its worker died comes with the tokens it
             had produced at the end of its prompt, and `output_offset` saying how many.
  transfer   a prefill worker computes the prompt and writes its KV into those blocks; it must
             complete within reservation_timeout (the router's prefill timeout plus a
             transfer's), else the request is aborted and its blocks freed.
  waiting    KV and first token are in: the sequence joins the running batch at the next step.
  running    one token per step. The new tokens of every sequence go to the router once per
             step, collected by its long-poll `get_outputs` (never a call per token).
  finished   stop, length, abort or error: the blocks go back to the pool.

Every answer that changes the load (`reserve`, `submit`, `get_outputs`) carries it: free blocks,
sequences held, and a serial number, so the router can tell a newer picture from an older one.

With role "colocated" the worker takes whole requests (`submit`) and its engine prefills
them too, mixing prompt chunks with decodes: the baseline for disaggregation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import socket
import threading
import time

import torch

from engine.config import EngineConfig
from engine.engine_loop import EarlyAborts, EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams
from kv_transfer import make_receiver

# What the router receives per request and step: (request_id, new token ids, finish reason or
# None, error message or None, the new tokens' logprobs or None, with a request's first tokens
# the prompt logprobs it asked for if this worker computed the prompt (colocated), else None).
Output = tuple[str, list[int], "str | None", "str | None", "list[TokenLogprobs] | None", "list[TokenLogprobs | None] | None"]


@dataclasses.dataclass
class _Reservation:
    prompt_token_ids: list[int]
    params: SamplingParams
    output_offset: int
    deadline: float


class DecodeWorker:
    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        role: str = "decode",
        transfer: str | None = "grpc",
        transfer_timeout: float = 60.0,
        host: str = "127.0.0.1",
        threads: int | None = None,
        reservation_timeout: float = 660.0,
        kv_secret: bytes = b"",
    ):
        if threads:
            torch.set_num_threads(threads)
        self.id, self.role = worker_id, role
        self.engine = LLMEngine(dataclasses.replace(config, detokenize=False))
        self.reservation_timeout = reservation_timeout
        self.receiver = None
        if host == "auto":  # on a multi-node cluster, prefill workers elsewhere must reach us
            import ray

            host = ray.util.get_node_ip_address()
        if role == "decode":
            self.receiver = make_receiver(transfer, self.engine.kv_cache.kv, self._kv_arrived, kv_secret, host, transfer_timeout)
        self._expected: dict[str, _Reservation] = {}  # engine thread only
        self._early_aborts = EarlyAborts()  # engine thread only
        self._outbox: list[Output] = []
        self._outbox_since = 0.0  # Unix time its oldest outputs were produced
        self._outbox_lock = threading.Lock()
        self._wakeup: asyncio.Event | None = None
        self._load_serial = itertools.count(1)
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.loop = EngineLoop(self.engine, self._on_outputs, name=f"engine-{worker_id}")
        self.loop.start()

    # --- called by the router (Ray actor methods) ------------------------------------------------

    async def ready(self) -> dict:
        """Stats, and where it runs: host, Ray node id and address, process id."""
        import ray

        return {**await self.stats(), "node": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                "node_address": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "max_num_seqs": self.engine.config.max_num_seqs}  # fmt: skip

    async def reserve(self, request_id: str, prompt_token_ids: list[int], params: dict, output_offset: int = 0) -> dict:
        """Blocks for a prompt whose KV a prefill worker will send: where and into which blocks
        (block_ids None: refused), and the load after it."""
        blocks = await self._call(self._reserve, request_id, prompt_token_ids, SamplingParams(**params), output_offset)
        return {"address": self.receiver.address, "block_ids": blocks, "load": self._load()}

    async def submit(self, request_id: str, prompt_token_ids: list[int], params: dict, output_offset: int = 0) -> dict:
        """Colocated role: a whole request, prefilled and decoded here."""
        await self._call(self._submit, request_id, prompt_token_ids, SamplingParams(**params), output_offset)
        return {"load": self._load()}

    async def abort(self, request_id: str) -> bool:
        return await self._call(self._abort, request_id)

    async def get_outputs(self, timeout: float = 1.0) -> dict:
        """Long poll: everything produced since the last call, as soon as there is something (or
        after `timeout`), with the load the router routes by, and `step_time`: when the oldest of
        these outputs was produced (Unix seconds; the router passes it on, for measuring its delay)."""
        self._bind_event_loop()
        if not self._outbox:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        if self._expected:
            self.loop.call(self._expire_reservations)  # not awaited: it would wait for the step in flight
        with self._outbox_lock:
            outputs, self._outbox, step_time = self._outbox, [], self._outbox_since
        return {"outputs": outputs, "load": self._load(), "step_time": step_time}

    async def ping(self) -> dict:
        """Its engine's health (EngineLoop.health): the router's check after a worker on this node died."""
        return self.loop.health

    async def stats(self) -> dict:
        stats = await self._call(self.engine.stats)
        if self.receiver is not None:  # what the KV receiver refused, by reason
            stats["receive_failures"] = self.receiver.failures()
        return {"id": self.id, "role": self.role, **stats}

    async def check_invariants(self) -> int:
        """Check now (raises on a violation); returns how many idle-time checks have failed."""
        await self._call(self.engine.check_invariants)
        return self.loop.invariant_violations

    async def shutdown(self) -> None:
        self.loop.stop()
        if self.receiver is not None:
            self.receiver.close()

    # --- engine thread -------------------------------------------------------------------------

    def _reserve(self, request_id, prompt_token_ids, params, output_offset) -> list[int] | None:
        if request_id in self._early_aborts:
            return None  # refused: its abort came first, and nobody waits for it
        self.engine.validate_prompt(prompt_token_ids, params, output_offset)
        blocks = self.engine.reserve(request_id, len(prompt_token_ids))
        if blocks is not None:
            self.receiver.expect(request_id, blocks)
            deadline = time.monotonic() + self.reservation_timeout
            self._expected[request_id] = _Reservation(list(prompt_token_ids), params, output_offset, deadline)
        return blocks

    def _submit(self, request_id, prompt_token_ids, params, output_offset) -> None:
        if request_id not in self._early_aborts:  # else as if taken and aborted at once
            self.engine.add_request(request_id, prompt_token_ids, params, output_offset=output_offset)

    def _kv_arrived(self, request_id: str, first_token: int, error: str | None, first_logprobs: tuple | None) -> None:
        """Called by the receiver's thread."""
        self.loop.call(self._admit, request_id, first_token, error, first_logprobs)

    def _admit(self, request_id: str, first_token: int, error: str | None, first_logprobs: tuple | None) -> None:
        reservation = self._expected.pop(request_id, None)
        if reservation is None:
            return  # aborted or expired meanwhile; its blocks are already free
        if error is None and not 0 <= first_token < self.engine.model_config.vocab_size:
            self.receiver.count("range")
            error = f"first token {first_token} outside the vocabulary"
        if error is not None:
            self.engine.abort(request_id)
            self._publish([(request_id, [], "abort", f"KV transfer failed: {error}", None, None)])
            return
        logprobs = TokenLogprobs(*first_logprobs) if first_logprobs is not None else None
        self.engine.add_prefilled(
            request_id, reservation.prompt_token_ids, first_token, reservation.params, logprobs, reservation.output_offset
        )
        # The first token goes out now, not with the next step's: a decode step (and a long poll)
        # less of time to first token.
        self._on_outputs(self.engine.take_outputs())

    def _abort(self, request_id: str) -> bool:
        # On the engine thread, so the receiver lets go of the blocks (waiting for a write in
        # progress) before the engine frees them.
        if self._expected.pop(request_id, None) is not None:
            self.receiver.cancel(request_id)
        if self.engine.abort(request_id):
            return True
        self._early_aborts.add(request_id)  # finished already, or its reserve()/submit() is yet to come
        return False

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, res in self._expected.items() if res.deadline < now]:
            del self._expected[request_id]
            self.receiver.cancel(request_id)
            self.engine.abort(request_id)
            self._publish([(request_id, [], "abort", f"KV did not arrive within {self.reservation_timeout:.0f}s", None, None)])

    def _on_outputs(self, outputs) -> None:
        self._publish([(o.request_id, o.new_token_ids, o.finish_reason, None, _new_logprobs(o),
                         o.prompt_logprobs if len(o.token_ids) == len(o.new_token_ids) else None) for o in outputs])  # fmt: skip

    def _publish(self, outputs: list[Output]) -> None:
        with self._outbox_lock:
            if not self._outbox:
                self._outbox_since = time.time()
            self._outbox += outputs
        if self._event_loop is not None:
            self._event_loop.call_soon_threadsafe(self._wakeup.set)

    # --- plumbing ----------------------------------------------------------------------------

    def _bind_event_loop(self) -> None:
        if self._wakeup is None:
            self._event_loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()

    async def _call(self, fn, *args):
        self._bind_event_loop()
        return await asyncio.wrap_future(self.loop.call(fn, *args))

    def _load(self) -> dict:
        """Cheap, lock-free reads (len of containers, counters) for routing; `stats` is the exact picture.
        "running" counts every sequence it holds: running, waiting, or reserved for a transfer.
        "free_blocks" leaves out the blocks its waiting sequences will take: a colocated worker holds
        its queued prompts' blocks only once a step admits them, and the router, reading only free
        blocks, sent every request arriving within a step to the same worker (the one with the
        most free), hundreds at once at 512 workers in the simulator."""
        sched = self.engine.scheduler
        running = len(sched.running) + len(sched.waiting) + len(sched.reserved)
        serial = next(self._load_serial)
        free = sched.allocator.num_free - sched.waiting_blocks
        return {"free_blocks": free, "running": running, "serial": serial, **self.loop.health}


def _new_logprobs(output) -> list[TokenLogprobs] | None:
    if output.logprobs is None:
        return None
    return output.logprobs[len(output.token_ids) - len(output.new_token_ids) :]

"""The prefill worker: an engine in prefill-only mode plus a KV sender. Made a Ray actor by
cluster/; the logic lives in engine/ and kv_transfer/.

A request's stages here:

  queued      `prefill` hands it to the engine, which batches waiting prompts under its token
              budget per step (chunked, reusing cached prefixes).
  computing   on the step that completes its prompt, each group of layers is gathered and sent
              to the decode worker's reserved blocks as soon as those layers are computed.
  sampled     the first token is sampled and sent after the KV (with its logprobs, if asked);
              the request holds its blocks.
  delivered   the decode worker acknowledges: the blocks are released and stay as prefix cache;
              `prefill` returns the first token and when each stage began and ended (seconds
              after the call arrived, so the router can place them on its own clock). A failed
              or cancelled transfer releases them too and raises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from concurrent.futures import Future

import torch

from engine.config import EngineConfig
from engine.engine_loop import EarlyAborts, EngineLoop, EngineStopped
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_transfer import Destination, OutgoingTransfer, TransferError, make_sender
from kv_transfer.stats import TransferStats


class PrefillAborted(Exception):
    """The request was aborted before its KV was delivered."""


@dataclasses.dataclass
class _Job:
    dest: Destination
    done: Future  # result: what `prefill` returns; exception: TransferError or PrefillAborted
    received: float  # time.perf_counter() when `prefill` was called
    transfer: OutgoingTransfer | None = None
    started: float = 0.0  # when its first chunk was handed to the sender
    nbytes: int = 0
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # stage -> seconds after `received`
    prompt_logprobs: list | None = None  # the engine's, when the request asked

    def mark(self, phase: str, at: float) -> None:
        self.phases[phase] = at - self.received

    def fail(self, error: Exception) -> None:
        if self.transfer is not None:
            self.transfer.cancel()
        if not self.done.done():
            self.done.set_exception(error)


class PrefillWorker:
    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        transfer: str = "grpc",
        transfer_timeout: float = 60.0,
        threads: int | None = None,
        kv_secret: bytes = b"",
    ):
        if threads:
            torch.set_num_threads(threads)
        self.id = worker_id
        self.engine = LLMEngine(dataclasses.replace(config, detokenize=False))
        # start() only queues: opening a channel and sending run on the sender's threads, so a
        # dead or frozen decode worker never holds up this worker's engine thread.
        self.sender = make_sender(transfer, self.engine.kv_cache.kv, kv_secret, transfer_timeout)
        self._jobs: dict[str, _Job] = {}  # engine thread only
        self._early_aborts = EarlyAborts()  # engine thread only
        self.transfers = TransferStats()  # engine thread only
        kv = self.engine.kv_cache.kv
        self._bytes_per_block = kv[:, :, 0].numel() * kv.element_size()
        self.loop = EngineLoop(self.engine, self._on_outputs, self._on_layer, self._on_stop, name=f"engine-{worker_id}")
        self.loop.start()

    # --- called by the router (Ray actor methods) ------------------------------------------------

    async def ready(self) -> dict:
        """Stats, and where it runs: host, Ray node id and address, process id."""
        import ray

        return {**await self.stats(), "node": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                "node_address": ray.util.get_node_ip_address(), "pid": os.getpid()}  # fmt: skip

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: dict, destination: dict, output_offset: int = 0
    ) -> dict:
        """Compute the prompt's KV, ship it and the first token to `destination` (a decode
        worker's reservation). Once the decode worker has acknowledged: {"first_token",
        "phases": {prefill_started, prefill_ended, transfer_started, transfer_ended: seconds
        after this call arrived}, "prompt_logprobs": the engine's, when params ask, else None}.
        `output_offset`: see LLMEngine (a request resumed here)."""
        received = time.perf_counter()
        dest = Destination(destination["address"], request_id, tuple(destination["block_ids"]))
        params = SamplingParams(**params)
        job_done = await self._call(self._add, request_id, prompt_token_ids, params, dest, output_offset, received)
        return await asyncio.wrap_future(job_done)

    async def abort(self, request_id: str) -> bool:
        return await self._call(self._abort, request_id)

    async def ping(self) -> dict:
        """Its engine's health (EngineLoop.health); answered on the actor's event loop, not the
        engine thread: a long step is not silence."""
        return self.loop.health

    async def stats(self) -> dict:
        stats = await self._call(lambda: {**self.engine.stats(), "transfer": self.transfers.snapshot()})
        return {"id": self.id, "role": "prefill", **stats}

    async def check_invariants(self) -> int:
        """Check now (raises on a violation); returns how many idle-time checks have failed."""
        await self._call(self.engine.check_invariants)
        return self.loop.invariant_violations

    async def shutdown(self) -> None:
        self.loop.stop()
        self.sender.close()

    # --- engine thread -------------------------------------------------------------------------

    def _add(self, request_id, prompt_token_ids, params, dest, output_offset, received) -> Future:
        if request_id in self._early_aborts:  # its abort came first
            aborted = Future()
            aborted.set_exception(PrefillAborted(request_id))
            return aborted
        self.engine.add_request(request_id, prompt_token_ids, params, prefill_only=True, output_offset=output_offset)
        job = self._jobs[request_id] = _Job(dest, Future(), received)
        return job.done

    def _on_layer(self, layer: int, completing: list[tuple[str, list[int]]]) -> None:
        for request_id, block_ids in completing:
            job = self._jobs.get(request_id)
            if job is None or job.done.done():
                continue
            try:
                if job.transfer is None:
                    job.started, job.nbytes = time.perf_counter(), len(block_ids) * self._bytes_per_block
                    job.mark("transfer_started", job.started)
                    job.transfer = self.sender.start(job.dest, block_ids)
                job.transfer.layers_done(layer + 1)
            except (TransferError, torch.OutOfMemoryError) as e:  # OOM: the chunk's copy on the GPU; this request fails, not the engine
                self.transfers.failures += 1
                job.fail(e if isinstance(e, TransferError) else TransferError(f"out of memory gathering the KV: {e}"))

    def _on_outputs(self, outputs) -> None:
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is None:
                continue
            if out.finish_reason != "prefilled":  # aborted inside the engine
                self._finish(out.request_id, PrefillAborted(out.request_id))
                continue
            job.mark("prefill_started", out.first_scheduled_time)
            job.mark("prefill_ended", time.perf_counter())
            job.prompt_logprobs = out.prompt_logprobs
            if job.done.done():  # the transfer failed while the layers were going out
                self._finish(out.request_id, None)
            elif job.transfer is None:
                self._finish(out.request_id, TransferError(f"the KV of {out.request_id} was never sent"))
            else:
                first_token = out.token_ids[0]
                delivered = job.transfer.finish(first_token, out.logprobs[0] if out.logprobs else None)
                # Timed as the acknowledgement comes (on the sender's thread), not when this thread
                # gets to it: that waits for the step in flight, a whole prefill step under load.
                delivered.add_done_callback(
                    lambda f, r=out.request_id, t=first_token: self.loop.call(self._delivered, r, t, f, time.perf_counter())
                )

    def _delivered(self, request_id: str, first_token: int, delivered: Future, at: float) -> None:
        error = delivered.exception()
        job = self._jobs.get(request_id)
        if isinstance(error, TransferError):
            self.transfers.failures += 1
        elif error is None and job is not None:
            self.transfers.record(at - job.started, job.nbytes)
            job.mark("transfer_ended", at)
        self._finish(request_id, error, first_token)

    def _finish(self, request_id: str, error: Exception | None, first_token: int = -1) -> None:
        """The request leaves this worker: release (or abort) its blocks and answer `prefill`."""
        job = self._jobs.pop(request_id, None)
        self.engine.release(request_id)
        self.engine.abort(request_id)  # no-op unless it was still queued or computing
        if job is None:
            return
        if error is None and not job.done.done():
            job.done.set_result({"first_token": first_token, "phases": job.phases, "prompt_logprobs": job.prompt_logprobs})
        else:  # also when `prefill`'s caller is gone: whatever is still going out stops
            job.fail(error or PrefillAborted(request_id))

    def _on_stop(self, error: BaseException | None) -> None:
        """The engine loop is gone: nothing in flight here will finish."""
        for job in self._jobs.values():
            job.fail(EngineStopped(f"prefill worker {self.id} stopped: {error!r}"))
        self._jobs.clear()

    def _abort(self, request_id: str) -> bool:
        if request_id not in self._jobs:
            self._early_aborts.add(request_id)  # finished already, or its prefill() is yet to come
            return False
        self._finish(request_id, PrefillAborted(request_id))
        return True

    # --- plumbing ----------------------------------------------------------------------------

    async def _call(self, fn, *args):
        return await asyncio.wrap_future(self.loop.call(fn, *args))


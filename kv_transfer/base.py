"""Sender and receiver sides of a KV transfer, shared by both backends.

Ownership handoff (who frees which blocks when):

  decode worker D                                   prefill worker P
  ---------------                                   ----------------
  reserve(): owns the destination blocks
  receiver.expect(request, blocks)
                                                    computes the prompt; owns its source blocks
                                 <-- chunks ---     sender.start(...).layers_done(n) as layers finish
                                 <-- last   ---     .finish(first_token, logprobs): the last chunk,
                                                    with the first sampled token (and its logprobs)
  all chunks checked and written:
  ack ok ------------------------------------->     future resolves: P releases its blocks (they
  the sequence joins D's running batch              stay as prefix cache)

  Failure: on D's side (bad checksum, metadata mismatch, cancel) D's expectation is dropped and
  the refusal is sent back; on P's side (peer gone, timeout, cancel) the sender's future raises
  TransferError. D still owns its reserved blocks and P its source blocks; each side's worker
  frees its own: P releases at once, D when the router aborts the request (it does when the
  prefill fails) or, failing that, when the reservation expires.
"""

from __future__ import annotations

import abc
import queue
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from kv_transfer.wire import MAX_CHUNK_BYTES, ChunkMeta, KVLayout, TransferError, checksum, gather, plan_chunks, scatter

# on_complete(request_id, first_token, error, first_logprobs): error is None on success (then
# first_token is set, and first_logprobs if the request asked for them)
CompletionCallback = Callable[[str, int, "str | None", "tuple | None"], None]


@dataclass(frozen=True)
class Destination:
    address: str  # the receiver's endpoint, from KVReceiver.address
    request_id: str
    block_ids: tuple[int, ...]  # the receiver's reserved blocks, in the request's block order


@dataclass
class OutgoingChunk:
    """A gathered chunk queued for the backend's thread; the last one carries the first token."""

    transfer: "OutgoingTransfer"
    chunk: tuple[int, int, int, int]
    data: torch.Tensor
    ready: "torch.cuda.Event | None"  # the gather's completion on the GPU
    first_token: int = -1
    first_logprobs: tuple | None = None

    def meta(self) -> ChunkMeta:
        """Describe the chunk; called on the sending thread (the checksum reads the data)."""
        if self.ready is not None:
            self.ready.synchronize()
        l0, l1, b0, b1 = self.chunk
        data = self.data
        return ChunkMeta(self.transfer.dest.request_id, (l0, l1), (b0, b1), str(data.dtype).removeprefix("torch."),
                         tuple(data.shape), data.numel() * data.element_size(), checksum(data), self.first_token,
                         self.first_logprobs)  # fmt: skip


class OutgoingTransfer:
    """One request on its way out. The engine thread calls `layers_done` as layers finish (it
    gathers whole chunks right there, so later steps can never change what is sent) and
    `finish` with the first token, which rides on the last chunk; the backend's thread
    describes and sends them in order."""

    def __init__(self, kv: torch.Tensor, dest: Destination, src_block_ids: list[int], max_bytes: int, submit):
        if len(src_block_ids) != len(dest.block_ids):
            raise TransferError(f"{len(src_block_ids)} source blocks but {len(dest.block_ids)} reserved")
        self.kv = kv
        self.dest = dest
        self.src = torch.tensor(src_block_ids, dtype=torch.long, device=kv.device)
        self.chunks = plan_chunks(KVLayout.of(kv), len(src_block_ids), max_bytes)
        self._next = 0
        self._submit: Callable[[OutgoingChunk], None] = submit
        self.future: Future[None] = Future()

    @property
    def cancelled(self) -> bool:
        return self.future.done()

    def layers_done(self, num_layers: int) -> None:
        """Layers [0, num_layers) of this request are in the pool: ship the chunks they complete
        (all but the last chunk, which waits for the first token)."""
        while self._next < len(self.chunks) - 1 and self.chunks[self._next][1] <= num_layers:
            self._ship(self._next)

    def finish(self, first_token: int, first_logprobs: tuple | None = None) -> Future:
        """Ship what is left, the first token (and its logprobs) with the last chunk; the future
        resolves when the receiver acknowledges."""
        while self._next < len(self.chunks):
            last = self._next == len(self.chunks) - 1
            self._ship(self._next, first_token if last else -1, first_logprobs if last else None)
        return self.future

    def _ship(self, index: int, first_token: int = -1, first_logprobs: tuple | None = None) -> None:
        self._next = index + 1
        if self.cancelled:
            return
        chunk = self.chunks[index]
        data = gather(self.kv, chunk, self.src)
        ready = None
        if data.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        self._submit(OutgoingChunk(self, chunk, data, ready, first_token, first_logprobs))

    def cancel(self) -> None:
        self.fail(TransferError(f"transfer of {self.dest.request_id} cancelled"))

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def succeed(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class KVSender:
    """Prefill side: one per worker, any number of destinations, a channel per destination.
    `start` only queues: opening a channel, sending and closing run on the channel's threads,
    so a dead or frozen receiver holds up nothing but the transfers bound for it."""

    def __init__(self, kv: torch.Tensor, open_channel: Callable[[str], "SenderChannel"], max_chunk_bytes: int):
        self.kv = kv
        self.max_chunk_bytes = max_chunk_bytes
        self._channels = Channels(open_channel)

    def start(self, dest: Destination, src_block_ids: list[int]) -> OutgoingTransfer:
        """A transfer of src_block_ids into dest's reserved blocks; chunks go as layers are done."""
        channel = self._channels.get(dest.address)
        transfer = OutgoingTransfer(self.kv, dest, src_block_ids, self.max_chunk_bytes, channel.pending.put)
        channel.track(transfer)
        return transfer

    def close(self) -> None:
        """Close every channel; transfers still in flight fail."""
        self._channels.close()


class SenderChannel:
    """One channel to one receiver, the part both backends share: chunks wait in `pending` for
    the backend's thread, in submission order; each transfer is tracked from `start` to its
    acknowledgement. A watch thread, whatever the backend's threads are blocked on, breaks the
    channel once it has transfers in flight and no answer for `timeout`: the deadline is on the
    channel's progress, not on each transfer, since transfers queued behind one another on a busy
    but healthy channel would otherwise time out for the queue's length. A broken channel fails everything it tracks and refuses new transfers (the
    next `start` to that address opens a new channel). `close` never blocks: it wakes the
    backend's threads (`_wake`), which tear the channel down themselves."""

    TICK = 0.25  # seconds between looks for overdue transfers

    def __init__(self, address: str, timeout: float):
        self.address = address
        self.timeout = timeout
        self.pending: queue.Queue[OutgoingChunk | None] = queue.Queue()
        self._inflight: dict[str, OutgoingTransfer] = {}  # by request id
        self._progress = 0.0  # monotonic time of the last answer, or of the first transfer since the last answer
        self._lock = threading.Lock()
        self._closed = threading.Event()  # broken or closed: it takes no more transfers
        threading.Thread(target=self._watch, name=f"kv-watch-{address}", daemon=True).start()

    @property
    def broken(self) -> bool:
        return self._closed.is_set()

    def track(self, transfer: OutgoingTransfer) -> None:
        with self._lock:
            refused = self.broken  # since start() chose this channel: _end() has failed what it tracked
            if not refused:
                if not self._inflight:
                    self._progress = time.monotonic()
                self._inflight[transfer.dest.request_id] = transfer
        if refused:
            transfer.fail(TransferError("the KV channel broke"))
            return
        transfer.future.add_done_callback(lambda _: self._forget(transfer.dest.request_id))

    def settle(self, request_id: str, ok: bool, error: str) -> None:
        """The receiver's answer for a request (ignored if it is no longer in flight)."""
        with self._lock:
            transfer = self._inflight.get(request_id)
            if transfer is not None:  # the receiver answers for one of ours: the channel is alive
                self._progress = time.monotonic()
        if transfer is None:
            return
        if ok:
            transfer.succeed()
        else:
            transfer.fail(TransferError(f"receiver refused {request_id}: {error}"))

    def fail(self, reason: str) -> None:
        """The channel is unusable: fail what is on it, and close it."""
        self._end(f"failed: {reason}")

    def close(self) -> None:
        self._end("closed")

    def _end(self, why: str) -> None:
        with self._lock:  # with track(): a transfer is either failed here or refused there
            first = not self._closed.is_set()
            self._closed.set()
            transfers = list(self._inflight.values())
        for transfer in transfers:
            transfer.fail(TransferError(f"KV channel to {self.address} {why}"))
        if first:
            self.pending.put(None)
            self._wake()

    def _wake(self) -> None:
        """Unblock the backend's threads (without waiting for them)."""

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._inflight.pop(request_id, None)

    def _watch(self) -> None:
        """No answer for `timeout` with transfers in flight means a stuck channel (a peer that
        accepts and never answers, or is frozen): its transfers fail and the channel is dropped."""
        while not self._closed.wait(self.TICK):
            with self._lock:
                stuck = bool(self._inflight) and time.monotonic() - self._progress > self.timeout
            if stuck:
                self.fail(f"transfers not acknowledged within {self.timeout:.0f}s")


class Channels:
    """A sender's channels, one per receiver address: opened on first use, replaced once broken.
    Opening and closing only start and wake threads, so the caller never waits on a peer."""

    def __init__(self, open_channel: Callable[[str], SenderChannel]):
        self._open = open_channel
        self._channels: dict[str, SenderChannel] = {}
        self._lock = threading.Lock()

    def get(self, address: str) -> SenderChannel:
        with self._lock:
            for gone in [a for a, c in self._channels.items() if c.broken and a != address]:
                del self._channels[gone]  # e.g. a decode worker that died or left: its address may never come back
            channel = self._channels.get(address)
            if channel is None or channel.broken:
                if channel is not None:
                    channel.close()
                channel = self._channels[address] = self._open(address)
            return channel

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


class KVReceiver(abc.ABC):
    """Decode side: one per worker; writes arriving chunks straight into reserved blocks."""

    address: str
    table: "ReceiveTable"

    def expect(self, request_id: str, block_ids: list[int]) -> None:
        """Chunks for request_id may now arrive, to be written into block_ids."""
        self.table.expect(request_id, block_ids)

    def cancel(self, request_id: str) -> None:
        """Refuse the rest of request_id's chunks (waiting for a write in progress)."""
        self.table.cancel(request_id)

    def failures(self) -> dict[str, int]:
        """What this receiver refused so far, by reason (kv_transfer.wire.REASONS)."""
        return self.table.failure_counts()

    def count(self, reason: str) -> None:
        """Count a refusal decided outside the receiver (e.g. a first token outside the vocabulary)."""
        self.table.count(reason)

    @abc.abstractmethod
    def close(self) -> None:
        """Stop receiving."""


class _Incoming:
    def __init__(self, block_ids: list[int], num_layers: int, device):
        self.block_ids = torch.tensor(block_ids, dtype=torch.long, device=device)
        self.received = np.zeros((num_layers, len(block_ids)), dtype=bool)


class ReceiveTable:
    """The receiver's expected requests: validates each chunk against the reservation and the
    local pool, checks its checksum, writes it into place, and reports completion once every
    layer of every block and the first token are in. Counts what it (or its backend) refuses."""

    def __init__(self, kv: torch.Tensor, on_complete: CompletionCallback):
        self.kv = kv
        self.layout = KVLayout.of(kv)
        self.on_complete = on_complete
        # No real chunk is bigger (plan_chunks splits a layer by blocks past the message limit).
        self.max_chunk_bytes = max(MAX_CHUNK_BYTES, self.layout.bytes_per_layer_block)
        self._lock = threading.Lock()
        self._incoming: dict[str, _Incoming] = {}
        self._failures: Counter[str] = Counter()

    def __contains__(self, request_id: str) -> bool:
        """Whether chunks for request_id are still expected."""
        with self._lock:
            return request_id in self._incoming

    def count(self, reason: str) -> None:
        with self._lock:
            self._failures[reason] += 1

    def failure_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._failures)

    def expect(self, request_id: str, block_ids: list[int]) -> None:
        if not block_ids or min(block_ids) < 0 or max(block_ids) >= self.kv.shape[2]:
            raise ValueError(f"reserved blocks for {request_id!r} are empty or outside the pool")
        with self._lock:
            self._incoming[request_id] = _Incoming(block_ids, self.layout.num_layers, self.kv.device)

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            return self._incoming.pop(request_id, None) is not None

    def check(self, meta: ChunkMeta) -> None:
        """Validate a chunk's metadata against the reservation and this pool's layout."""
        incoming = self._incoming.get(meta.request_id)
        if incoming is None:
            raise TransferError(f"no transfer expected for request {meta.request_id!r}", "unexpected")
        if not 0 < meta.nbytes <= self.max_chunk_bytes:
            raise TransferError(f"chunk of {meta.nbytes} bytes (at most {self.max_chunk_bytes})", "oversized")
        (l0, l1), (b0, b1) = meta.layers, meta.blocks
        lay = self.layout
        if meta.dtype != lay.dtype:
            raise TransferError(f"dtype mismatch: sender {meta.dtype}, receiver {lay.dtype}", "layout")
        if not (0 <= l0 < l1 <= lay.num_layers and 0 <= b0 < b1 <= len(incoming.block_ids)):
            raise TransferError(f"chunk layers {meta.layers} / blocks {meta.blocks} outside the reservation", "range")
        expected = (l1 - l0, 2, b1 - b0, lay.block_size, lay.num_kv_heads, lay.head_dim)
        if meta.shape != expected:
            raise TransferError(f"chunk shape {meta.shape} does not match this pool's layout {expected}", "layout")
        if meta.nbytes != (l1 - l0) * (b1 - b0) * lay.bytes_per_layer_block:
            raise TransferError(f"chunk size {meta.nbytes} does not match its shape", "layout")
        if incoming.received[l0:l1, b0:b1].any():
            raise TransferError(f"chunk layers {meta.layers} / blocks {meta.blocks} received twice", "duplicate")
        if meta.final:
            missing = int((~incoming.received).sum()) - (l1 - l0) * (b1 - b0)
            if missing:
                raise TransferError(f"last chunk before all KV arrived ({missing} layer-blocks missing)", "incomplete")

    def accept(self, meta: ChunkMeta, raw: "torch.Tensor | memoryview") -> bool:
        """Check and write one chunk (raw: its bytes). True when the request is complete (its last
        chunk, with the first token, is in and so is everything else). A TransferError drops the
        request's expectation and reports it."""
        try:
            with self._lock:
                self.check(meta)
            data = _as_tensor(raw, meta)
            # The checksum, the costly part, runs unlocked: other senders' chunks and the engine
            # thread's expect/cancel are not held up by it.
            if checksum(data) != meta.checksum:
                raise TransferError(f"checksum mismatch in chunk layers {meta.layers} blocks {meta.blocks}", "checksum")
            # The write happens under the lock, after checking again: cancel() waits for it, and
            # the decode worker cancels before it frees the reservation, so freed blocks are never
            # written.
            with self._lock:
                self.check(meta)
                incoming = self._incoming[meta.request_id]
                scatter(self.kv, meta, incoming.block_ids, data.view(meta.shape).to(self.kv.device))
                incoming.received[slice(*meta.layers), slice(*meta.blocks)] = True
                if not meta.final:
                    return False
                del self._incoming[meta.request_id]
        except TransferError as e:
            self.fail(meta.request_id, str(e))
            raise
        self.on_complete(meta.request_id, meta.first_token, None, meta.first_logprobs)
        return True

    def fail(self, request_id: str, error: str) -> None:
        if self.cancel(request_id):
            self.on_complete(request_id, -1, error, None)


class OrderedStream:
    """One sender's messages, in order, on a channel carrying many requests. Each request is
    answered once: when it is complete, or at its first failure; the rest of a failed request's
    chunks are then dropped as they come (the channel stays in step)."""

    MAX_REFUSED = 4096  # a sender that stops mid-request never sends its last chunk: bound the memory

    def __init__(self, table: ReceiveTable):
        self.table = table
        self._refused: OrderedDict[str, None] = OrderedDict()

    def receive(self, meta: ChunkMeta, raw: "torch.Tensor | memoryview") -> tuple[str, bool, str] | None:
        """The (request_id, ok, error) answer this chunk calls for, if any."""
        if meta.request_id in self._refused:
            if meta.final:
                del self._refused[meta.request_id]
            return None
        try:
            done = self.table.accept(meta, raw)
        except TransferError as e:
            self.table.count(e.reason)
            if not meta.final:
                self._refused[meta.request_id] = None
                if len(self._refused) > self.MAX_REFUSED:
                    self._refused.popitem(last=False)
            return meta.request_id, False, str(e)
        return (meta.request_id, True, "") if done else None


def _as_tensor(raw: "torch.Tensor | memoryview", meta: ChunkMeta) -> torch.Tensor:
    """A chunk's bytes as a flat tensor of its dtype (a view: no copy). `check` has validated the
    dtype against the pool already."""
    nbytes = raw.numel() * raw.element_size() if isinstance(raw, torch.Tensor) else len(raw)
    if nbytes != meta.nbytes:
        raise TransferError(f"chunk carries {nbytes} bytes, its metadata says {meta.nbytes}", "layout")
    dtype = getattr(torch, meta.dtype)
    if isinstance(raw, torch.Tensor):
        return raw.view(torch.uint8).view(dtype)
    with warnings.catch_warnings():  # a view of read-only bytes: it is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=dtype)

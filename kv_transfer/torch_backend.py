"""The `nccl` backend: torch.distributed point-to-point between a prefill/decode pair.

NCCL when the pools are on GPUs, gloo on CPU: the same code, the process-group class is the
only difference. Groups are per pair and made on demand, so pools can grow and shrink.

The decode worker hosts a TCPStore (its `address`) with an inbox queue, drained by one
receiver thread over two long-lived connections (no connection churn inside the worker).
Everything the receiver waits for is announced through the inbox first: queue pops can wait
as long as they like, while a timed-out gloo receive would break its pair.

  P (first transfer to D): n = next pair number; push {pair n, hello}; join group "pg{n}" as rank 0
  D: pops hello, joins group "pg{n}" as rank 1
  P: push {pair n, ChunkMeta}; group.send(chunk bytes)  ->  D: pops, bounds meta.nbytes by the
                                                           pool's size, group.recv, checks
  ...one such pair of messages per chunk; the last chunk's metadata carries the first token
  D: store "pg{n}/ack/{request_id}" = {ok, error}  ->  P's ack thread waits for it (timeout), settles
                                                        the transfer; the next request's chunks are
                                                        already on their way meanwhile
  P (closing the pair): push {pair n, bye}  ->  D drops its end

A broken pair (peer gone, timeout) fails its transfers and is dropped; the next transfer to
that address builds a new one.
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist

from kv_transfer.base import Channels, CompletionCallback, Destination, KVReceiver, KVSender, OrderedStream, OutgoingChunk, OutgoingTransfer, ReceiveTable
from kv_transfer.wire import ChunkMeta, TransferError

logger = logging.getLogger(__name__)

_IDLE_WAIT = timedelta(minutes=10)  # the inbox pop: close() wakes it, this only bounds each wait
_INBOX = "inbox"
# No message limit to respect, but the receiver allocates a buffer per chunk and checksums it:
# bound that (a layer of a long prompt is split by blocks past it).
_MAX_CHUNK_BYTES = 64 << 20


def make_pair_group(store, rank: int, device: torch.device, timeout: float):
    """A 2-rank process group on `store`: NCCL for CUDA tensors, gloo otherwise."""
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    return dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=timeout))


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


class TorchDistSender(KVSender):
    def __init__(self, kv: torch.Tensor, timeout: float = 30.0):
        self.kv = kv
        self._pairs = Channels(lambda address: _PairSender(address, kv.device, timeout))

    def start(self, dest: Destination, src_block_ids: list[int]) -> OutgoingTransfer:
        pair: _PairSender = self._pairs.get(dest.address)
        return OutgoingTransfer(self.kv, dest, src_block_ids, _MAX_CHUNK_BYTES, pair.pending.put)

    def close(self) -> None:
        self._pairs.close()


class _PairSender:
    def __init__(self, address: str, device: torch.device, timeout: float):
        self.timeout = timeout
        self.broken = False
        self.pending: queue.Queue[OutgoingChunk | None] = queue.Queue()
        host, port = _split(address)
        self.awaiting_ack: queue.Queue[OutgoingTransfer | None] = queue.Queue()
        try:
            self.inbox = dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=timeout))
            self._ack_store = dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=timeout))
            self.pair = self.inbox.add("pairs", 1) - 1
            self.inbox.queue_push(_INBOX, msgpack.packb({"pair": self.pair, "hello": True}))
            self.store = dist.PrefixStore(f"pg{self.pair}", self.inbox)
            self.group = make_pair_group(self.store, 0, device, timeout)
        except Exception as e:  # noqa: BLE001 - any failure to connect is a transfer failure
            raise TransferError(f"cannot open a KV channel to {address}: {e}") from None
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{address}", daemon=True)
        self._thread.start()
        self._acks = threading.Thread(target=self._read_acks, name=f"kv-acks-{address}", daemon=True)
        self._acks.start()

    def close(self) -> None:
        if self.group is None:
            return
        self.pending.put(None)
        self._thread.join(self.timeout)
        self.awaiting_ack.put(None)
        self._acks.join(self.timeout)
        try:  # let the receiver drop its end of the pair (best effort: it may be gone)
            self.inbox.queue_push(_INBOX, msgpack.packb({"pair": self.pair, "bye": True}))
        except Exception:  # noqa: BLE001, S110
            pass
        self.group = None  # drop the group now: tearing gloo down at interpreter exit aborts


    def _run(self) -> None:
        while (item := self.pending.get()) is not None:
            transfer = item.transfer
            if self.broken:
                transfer.fail(TransferError("the KV channel broke"))
                continue
            if transfer.cancelled:
                continue  # nothing of a cancelled transfer goes out after the cancel
            try:
                self._send(item)
            except TransferError as e:
                transfer.fail(e)
            except Exception as e:  # noqa: BLE001 - the pair is unusable: fail this and what follows
                self.broken = True
                transfer.fail(TransferError(f"KV channel failed: {e}"))

    def _send(self, item: OutgoingChunk) -> None:
        meta = item.meta()
        self.inbox.queue_push(_INBOX, msgpack.packb({"pair": self.pair, "meta": meta.pack()}))
        self.group.send([item.data.view(-1).view(torch.uint8)], 1, 0).wait(timedelta(seconds=self.timeout))
        if meta.final:
            self.awaiting_ack.put(item.transfer)

    def _read_acks(self) -> None:
        """Acks come in the order the requests were completed: wait for each in turn (bounded)."""
        store = dist.PrefixStore(f"pg{self.pair}", self._ack_store)
        while (transfer := self.awaiting_ack.get()) is not None:
            key = f"ack/{transfer.dest.request_id}"
            try:
                store.wait([key], timedelta(seconds=self.timeout))
                ack = msgpack.unpackb(store.get(key))
                store.delete_key(key)
            except dist.DistStoreError:
                self.broken = True  # a stuck pair: the next transfer to this address gets a new one
                transfer.fail(TransferError(f"transfer of {transfer.dest.request_id} not acknowledged within {self.timeout:.0f}s"))
                continue
            except Exception as e:  # noqa: BLE001 - the store is gone (DistNetworkError: the peer died)
                self.broken = True
                transfer.fail(TransferError(f"KV channel failed: {e}"))
                continue
            if ack["ok"]:
                transfer.succeed()
            else:
                transfer.fail(TransferError(f"receiver refused {transfer.dest.request_id}: {ack['error']}"))


class TorchDistReceiver(KVReceiver):
    def __init__(self, kv: torch.Tensor, on_complete: CompletionCallback, host: str = "127.0.0.1", timeout: float = 30.0):
        self.kv = kv
        self.timeout = timeout
        self.table = ReceiveTable(kv, on_complete)
        server = dist.TCPStore(host, 0, None, True, timeout=timedelta(seconds=timeout), wait_for_workers=False)
        self._server = server
        self.address = f"{host}:{server.port}"
        # Two connections for the receiver thread: the inbox (pops may idle for long) and the rest.
        self._inbox = dist.TCPStore(host, server.port, None, False, timeout=_IDLE_WAIT)
        self._ops = dist.TCPStore(host, server.port, None, False, timeout=timedelta(seconds=timeout))
        self._groups: dict[int, tuple[object, OrderedStream]] = {}  # pair -> (group, its stream)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-recv", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._server.queue_push(_INBOX, b"")  # wake the receiver thread
        self._thread.join(self.timeout)
        self._groups.clear()  # drop the groups now: tearing gloo down at interpreter exit aborts

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                raw = self._inbox.queue_pop(_INBOX, True)
            except dist.DistStoreError:  # idle for _IDLE_WAIT: keep waiting
                continue
            if self._closed.is_set():
                return
            try:
                message = msgpack.unpackb(raw)
                pair = message["pair"]
                if message.get("hello"):
                    self._join(pair)
                elif message.get("bye"):
                    self._groups.pop(pair, None)
                elif pair in self._groups:
                    self._receive(pair, message["meta"])
            except Exception:  # noqa: BLE001 - one bad message or pair must not end every transfer here
                logger.exception("KV receiver: a message could not be handled")

    def _join(self, pair: int) -> None:
        try:
            group = make_pair_group(dist.PrefixStore(f"pg{pair}", self._ops), 1, self.kv.device, self.timeout)
            self._groups[pair] = (group, OrderedStream(self.table))
        except Exception as e:  # noqa: BLE001 - that sender will fail on its side
            logger.warning("KV pair %d could not be set up: %s", pair, e)

    def _receive(self, pair: int, raw_meta: bytes) -> None:
        group, stream = self._groups[pair]
        try:
            meta = ChunkMeta.unpack(raw_meta)
        except TransferError as e:
            logger.warning("KV pair %d: %s; dropping the pair", pair, e)
            del self._groups[pair]
            return
        # The bytes follow on the group whatever becomes of the chunk: read them to stay in step.
        if meta.nbytes > self.kv.numel() * self.kv.element_size():  # no real chunk is this big
            logger.warning("KV pair %d: chunk of %d bytes announced; dropping the pair", pair, meta.nbytes)
            self.table.fail(meta.request_id, "corrupt chunk metadata")
            del self._groups[pair]
            return
        try:
            raw = torch.empty(meta.nbytes, dtype=torch.uint8, device=self.kv.device)
            group.recv([raw], 0, 0).wait(timedelta(seconds=self.timeout))
        except Exception as e:  # noqa: BLE001 - the pair is gone
            self.table.fail(meta.request_id, f"KV channel failed mid-transfer: {e}")
            del self._groups[pair]
            return
        answer = stream.receive(meta, raw)
        if answer is not None:
            request_id, ok, error = answer
            ack_store = dist.PrefixStore(f"pg{pair}", self._ops)
            ack_store.set(f"ack/{request_id}", msgpack.packb({"ok": ok, "error": error}))

"""The `nccl` backend: torch.distributed point-to-point between a prefill/decode pair.

NCCL when the pools are on GPUs, gloo on CPU: the same code, the process-group class is the
only difference. A pair is a control link (kv_transfer.link: our own socket, authenticated
with the cluster's secret, carrying msgpack frames) plus a 2-rank process group for the bytes.
The decode worker listens only on the address it advertises; the pair's rendezvous store is a
dict on the decode side, reached by the sender through the link (torch's TCPStore would listen
on every interface, unauthenticated), and gloo's own sockets bind to the same addresses.

  P (first transfer to D, on the pair's thread): connect, prove the secret, check D's proof
  P, D: form group (P rank 0, D rank 1); P's rendezvous requests travel on the link
  P: {chunk, ChunkMeta} on the link; group.send(chunk bytes)  ->  D: bounds meta.nbytes, group.recv,
                                                                 checks, writes into the blocks
  ...one such pair of messages per chunk; the last chunk's metadata carries the first token
  D: {ack, request id, ok, error} on the link  ->  P settles the transfer; the next request's
                                                   chunks are already on their way meanwhile
  P (closing the pair): closes the link  ->  D drops its end

Threads: each pair has its own on both sides (P: open + send, read acks, watch deadlines; D:
read the link, form the group + receive), so a dead, frozen or slow peer holds up only its own
pair, and nothing here runs on the engine thread. A broken pair (peer gone, timeout, a message
out of protocol) fails its transfers and is dropped; the next transfer to that address opens a
new one. Pairs (and connections still proving the secret) are bounded per receiver.

gloo's pair sockets themselves carry no authentication: see deploy/README.md for what that
exposes. Chunk metadata, and so each chunk's checksum, only ever travels on the authenticated
link, and bytes are written into the pool only once they match it. One thing gloo (like NCCL)
does not survive: a message of another size than the one posted aborts the receiving process, so
a chunk whose announced size is out of bounds is refused before anything is received, and the
sender always sends exactly the bytes it announced.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.auth import Unauthenticated
from kv_transfer.base import CompletionCallback, KVReceiver, KVSender, OrderedStream, OutgoingChunk, ReceiveTable, SenderChannel
from kv_transfer.link import Link, LinkClosed
from kv_transfer.wire import MAX_CHUNK_BYTES, ChunkMeta, TransferError

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0  # seconds a new connection has to prove the secret
MAX_PAIRS = 64  # connections per receiver, authenticated or still proving it


def make_pair_group(store: dist.Store, rank: int, device: torch.device, timeout: float, host: str):
    """A 2-rank process group on `store`: NCCL for CUDA tensors, gloo (listening on `host`) otherwise."""
    if device.type == "cuda":
        # A dead or stalled peer must fail this pair's transfers, not the worker: on an error or a timeout
        # NCCL's watchdog by default (3) tears the whole process down; 2 aborts only the pair's communicator.
        # Read when the group is made; an operator's own setting stands.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = timedelta(seconds=timeout)
    return dist.ProcessGroupGloo(store, rank, 2, options)


# --- the pair's rendezvous store --------------------------------------------------------------

_STORE_COMMANDS = ("set", "get", "add", "check", "wait", "delete_key", "compare_set", "num_keys")


def _bytes(value) -> bytes:
    if not isinstance(value, (bytes, str)):  # bytes(n) of a peer's int n would allocate n bytes
        raise TypeError(f"a rendezvous value is bytes or str, not {type(value).__name__}")
    return value.encode() if isinstance(value, str) else value


def _seconds(timeout: timedelta | None, default: float) -> float:
    return default if timeout is None else min(timeout.total_seconds(), default)


class _PairStore(dist.Store):
    """A pair's rendezvous on the decode side: a dict, used directly by this end's group and,
    through the link, by the sender's. Bounded (keys, waits) like everything a peer can drive."""

    MAX_KEYS = 64

    def __init__(self, timeout: float):
        super().__init__()
        self._timeout = timeout
        self._data: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._closed = False

    def close(self) -> None:
        """The pair is gone: waits end now."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def serve(self, message: dict) -> dict:
        """Answer a rendezvous request from the sender's end."""
        command, args = message.get("cmd"), message.get("args")
        if command not in _STORE_COMMANDS or not isinstance(args, list):
            raise TransferError(f"unknown rendezvous request {command!r}", "malformed")
        try:
            if command == "wait" and len(args) == 2:  # the timeout travels as seconds
                args = [args[0], timedelta(seconds=min(max(0.0, float(args[1])), self._timeout))]
            return {"op": "store", "value": getattr(self, command)(*args)}
        except (TransferError, TypeError, ValueError, KeyError, OverflowError) as e:
            return {"op": "store", "error": str(e)}

    def set(self, key, value) -> None:
        with self._cond:
            if key not in self._data and len(self._data) >= self.MAX_KEYS:
                raise TransferError("too many rendezvous keys", "oversized")
            self._data[key] = _bytes(value)
            self._cond.notify_all()

    def get(self, key) -> bytes:
        self.wait([key])
        with self._cond:
            return self._data[key]

    def add(self, key, amount) -> int:
        with self._cond:  # an RLock: set() takes it again
            value = int(self._data.get(key, b"0")) + int(amount)
            self.set(key, str(value))
            return value

    def check(self, keys) -> bool:
        with self._cond:
            return all(k in self._data for k in keys)

    def wait(self, keys, timeout: timedelta | None = None) -> None:
        with self._cond:
            present = lambda: all(k in self._data for k in keys)  # noqa: E731
            if not self._cond.wait_for(lambda: present() or self._closed, _seconds(timeout, self._timeout)) or not present():
                raise TransferError(f"rendezvous keys {list(keys)} did not appear")

    def delete_key(self, key) -> bool:
        with self._cond:
            return self._data.pop(key, None) is not None

    def compare_set(self, key, expected, desired) -> bytes:
        with self._cond:
            current = self._data.get(key)
            if current is None and not _bytes(expected) or current == _bytes(expected):
                self.set(key, desired)
                return _bytes(desired)
            return current if current is not None else _bytes(expected)

    def num_keys(self) -> int:
        with self._cond:
            return len(self._data)


class _RemoteStore(dist.Store):
    """The sender's view of its pair's _PairStore: every call is a request on the link."""

    def __init__(self, pair: "_PairSender"):
        super().__init__()
        self._call = pair.store_call

    def set(self, key, value):
        self._call("set", key, _bytes(value))

    def get(self, key):
        return self._call("get", key)

    def add(self, key, amount):
        return self._call("add", key, amount)

    def check(self, keys):
        return self._call("check", list(keys))

    def wait(self, keys, timeout=None):
        self._call("wait", list(keys), *([] if timeout is None else [timeout.total_seconds()]))

    def delete_key(self, key):
        return self._call("delete_key", key)

    def compare_set(self, key, expected, desired):
        return self._call("compare_set", key, _bytes(expected), _bytes(desired))

    def num_keys(self):
        return self._call("num_keys")


# --- prefill side -------------------------------------------------------------------------------


class TorchDistSender(KVSender):
    def __init__(self, kv: torch.Tensor, secret: bytes, timeout: float = 30.0):
        super().__init__(kv, lambda address: _PairSender(address, kv.device, secret, timeout), MAX_CHUNK_BYTES)


class _PairSender(SenderChannel):
    """The sending end of a pair: its thread opens the link and the group, then sends the chunks
    queued meanwhile, in order; another reads the acks (and rendezvous answers) that come back."""

    def __init__(self, address: str, device: torch.device, secret: bytes, timeout: float):
        super().__init__(address, timeout)
        self.device = device
        self.secret = secret
        self.link: Link | None = None
        self._replies: queue.Queue[dict | None] = queue.Queue()
        self._store_lock = threading.Lock()
        threading.Thread(target=self._run, name=f"kv-send-{address}", daemon=True).start()

    def _run(self) -> None:
        group = None
        try:
            self.link = Link.connect(self.address, self.secret, self.timeout)
            if self._closed.is_set():
                return
            threading.Thread(target=self._read, name=f"kv-acks-{self.address}", daemon=True).start()
            # Held for the group's life: NCCL rendezvouses at the first send, after make_pair_group has
            # returned, through the C++ side of this object, which needs its Python half alive.
            store = _RemoteStore(self)
            group = make_pair_group(store, 0, self.device, self.timeout, self.link.local_host)
            while (item := self.pending.get()) is not None:
                if not item.transfer.cancelled:  # nothing of a cancelled transfer goes out after the cancel
                    self._send(group, item)
        except Exception as e:  # noqa: BLE001 - unreachable, unauthenticated, timed out, peer gone: all of it fails
            self.fail(f"{type(e).__name__}: {e}")
        finally:
            if self.link is not None:
                self.link.close()  # the receiver drops its end
            del group  # drop the group here: tearing gloo down at interpreter exit aborts

    def _send(self, group, item: OutgoingChunk) -> None:
        meta = item.meta()
        self.link.send({"op": "chunk", "meta": meta.pack()})
        group.send([item.data.view(-1).view(torch.uint8)], 1, 0).wait(timedelta(seconds=self.timeout))

    def _read(self) -> None:
        try:
            while True:
                message = self.link.recv()
                if message["op"] == "ack":
                    self.settle(str(message.get("request_id")), message.get("ok") is True, str(message.get("error", "")))
                elif message["op"] == "store":
                    self._replies.put(message)
                else:
                    raise TransferError(f"unexpected message {message['op']!r} from the receiver", "malformed")
        except (LinkClosed, TransferError) as e:
            self.fail(f"the receiver closed the channel ({e})")
        finally:
            self._replies.put(None)

    def store_call(self, command: str, *args):
        with self._store_lock:
            self.link.send({"op": "store", "cmd": command, "args": list(args)})
            try:
                reply = self._replies.get(timeout=self.timeout)
            except queue.Empty:
                raise TransferError(f"no rendezvous answer within {self.timeout:.0f}s") from None
        if reply is None:
            raise TransferError("the channel closed during the rendezvous")
        if "error" in reply:
            raise TransferError(f"rendezvous {command} failed: {reply['error']}")
        return reply.get("value")

    def _wake(self) -> None:
        if self.link is not None:
            self.link.close()


# --- decode side --------------------------------------------------------------------------------


class TorchDistReceiver(KVReceiver):
    def __init__(self, kv: torch.Tensor, on_complete: CompletionCallback, secret: bytes, host: str = "127.0.0.1",
                 timeout: float = 30.0, max_pairs: int = MAX_PAIRS):  # fmt: skip
        self.kv = kv
        self.secret = secret
        self.host = host
        self.timeout = timeout
        self.max_pairs = max_pairs
        self.table = ReceiveTable(kv, on_complete)
        self._listener = socket.create_server((host, 0))  # the advertised address only, never every interface
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._pairs: set[_PairReceiver] = set()
        self._connections = 0  # accepted and not yet closed: pairs, and connections proving the secret
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="kv-accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pairs = list(self._pairs)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._listener.close()
        for pair in pairs:
            pair.link.close()
        deadline = time.monotonic() + self.timeout
        for pair in pairs:  # they drop their groups as they end (bounded: a group may be mid-receive)
            pair.join(max(0.0, deadline - time.monotonic()))

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                admitted = not self._closed and self._connections < self.max_pairs
                self._connections += admitted
            if not admitted:
                self.table.count("refused")
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="kv-recv", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                link = Link.accept(conn, self.secret, self.timeout, HANDSHAKE_TIMEOUT)
            except Unauthenticated as e:
                self.table.count("unauthenticated")
                logger.warning("KV receiver: refused a connection: %s", e)
                return
            pair = _PairReceiver(link, self.table, self.kv.device, self.host, self.timeout)
            with self._lock:
                if self._closed:
                    link.close()
                    return
                self._pairs.add(pair)
            try:
                pair.run()
            finally:
                with self._lock:
                    self._pairs.discard(pair)
        finally:
            with self._lock:
                self._connections -= 1


class _PairReceiver:
    """The receiving end of a pair. `run` (the connection's thread) reads the link: rendezvous
    requests are answered at once, chunk metadata is queued for a second thread, which forms the
    group and receives the chunks' bytes. Two threads, because the sender's rendezvous requests
    must be served while this end waits to form the group (NCCL forms it at the first chunk)."""

    def __init__(self, link: Link, table: ReceiveTable, device: torch.device, host: str, timeout: float):
        self.link, self.table, self.device, self.host, self.timeout = link, table, device, host, timeout
        self.store = _PairStore(timeout)
        self.metas: queue.Queue[bytes | None] = queue.Queue()
        self.closed = False  # the link is down: whatever fails after that is a consequence, not counted again
        self._receiver = threading.Thread(target=self._receive, name="kv-recv-pair", daemon=True)

    def join(self, timeout: float) -> None:
        self._receiver.join(timeout)

    def run(self) -> None:
        self._receiver.start()
        try:
            while True:
                message = self.link.recv()
                if message["op"] == "store":
                    self.link.send(self.store.serve(message))
                elif message["op"] == "chunk":
                    self.metas.put(message.get("meta"))
                else:
                    raise TransferError(f"unknown control message {message['op']!r}", "malformed")
        except TransferError as e:
            self.table.count(e.reason)
            logger.warning("KV pair dropped: %s", e)
        except LinkClosed:
            pass
        finally:
            self.closed = True
            self.metas.put(None)
            self.store.close()
            self.link.close()

    def _receive(self) -> None:
        try:
            group = make_pair_group(self.store, 1, self.device, self.timeout, self.host)
        except Exception as e:  # noqa: BLE001 - the sender fails on its side
            if not self.closed:
                self.table.count("channel")
                logger.warning("KV pair could not be set up: %s", e)
            self.link.close()
            return
        stream = OrderedStream(self.table)
        try:
            while (raw := self.metas.get()) is not None:
                answer = self._chunk(group, stream, raw)
                if answer is not None:
                    request_id, ok, error = answer
                    self.link.send({"op": "ack", "request_id": request_id, "ok": ok, "error": error})
        except TransferError as e:  # the pair is out of step: drop it
            if not self.closed:
                self.table.count(e.reason)
                logger.warning("KV pair dropped: %s", e)
            self.link.close()
        except LinkClosed:
            pass
        except Exception:  # noqa: BLE001 - out of memory, a bug: the pair goes (its sender fails its transfers), not the worker
            self.table.count("internal")
            logger.exception("KV pair dropped")
            self.link.close()

    def _chunk(self, group, stream: OrderedStream, raw) -> tuple[str, bool, str] | None:
        meta = ChunkMeta.unpack(raw)
        if not 0 < meta.nbytes <= self.table.max_chunk_bytes:  # allocate nothing for an absurd size
            self.table.fail(meta.request_id, "corrupt chunk metadata")
            raise TransferError(f"chunk of {meta.nbytes} bytes announced", "oversized")
        # The bytes follow on the group whatever becomes of the chunk: read them to stay in step.
        data = torch.empty(meta.nbytes, dtype=torch.uint8, device=self.device)
        try:
            group.recv([data], 0, 0).wait(timedelta(seconds=self.timeout))
        except Exception as e:  # noqa: BLE001 - the peer is gone or stalled
            self.table.fail(meta.request_id, f"KV channel failed mid-transfer: {e}")
            raise TransferError(f"receive failed: {e}", "channel") from None
        return stream.receive(meta, data)

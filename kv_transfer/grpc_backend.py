"""The `grpc` backend: one client-streaming KvTransfer.Send call per request.

The sender opens the call when the transfer starts and feeds it chunks as layers finish;
grpc's own thread pulls them (describing each: checksum, host copy), so the engine thread only
gathers. The receiver is a grpc server in the decode worker; it writes each chunk into the
reserved blocks as it arrives and answers the call with an ack once the first token is in.
Messages are bounded by max_message_bytes on both ends, and the call has a deadline.
"""

from __future__ import annotations

import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from kv_transfer.base import CompletionCallback, Destination, KVReceiver, KVSender, OutgoingChunk, OutgoingTransfer, ReceiveTable
from kv_transfer.wire import ChunkMeta, TransferError
from protos import kv_transfer_pb2, kv_transfer_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
_ENVELOPE = 64 << 10  # room for the metadata and protobuf framing around a chunk's data


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    limit = max_message_bytes + _ENVELOPE
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


class GrpcSender(KVSender):
    def __init__(self, kv: torch.Tensor, timeout: float = 30.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.kv = kv
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._stubs: dict[str, tuple[grpc.Channel, kv_transfer_pb2_grpc.KvTransferStub]] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str):
        with self._lock:
            if address not in self._stubs:
                channel = grpc.insecure_channel(address, options=_channel_options(self.max_message_bytes))
                self._stubs[address] = (channel, kv_transfer_pb2_grpc.KvTransferStub(channel))
            return self._stubs[address][1]

    def start(self, dest: Destination, src_block_ids: list[int]) -> OutgoingTransfer:
        pending: queue.Queue[OutgoingChunk] = queue.Queue()
        transfer = OutgoingTransfer(self.kv, dest, src_block_ids, self.max_message_bytes, pending.put)
        call = self._stub(dest.address).Send.future(self._requests(transfer, pending), timeout=self.timeout)
        call.add_done_callback(lambda f: _settle(transfer, f))
        transfer.future.add_done_callback(lambda f: call.cancel())  # cancel() or a failure ends the call
        return transfer

    def _requests(self, transfer: OutgoingTransfer, pending: queue.Queue):
        """The call's request stream, pulled by grpc's thread."""
        while not transfer.cancelled:
            try:
                item = pending.get(timeout=self.timeout)
            except queue.Empty:
                transfer.fail(TransferError(f"no KV produced for {transfer.dest.request_id} in {self.timeout}s"))
                return
            meta = item.meta()
            data = b"" if item.data is None else item.data.cpu().view(-1).view(torch.uint8).numpy().tobytes()
            yield kv_transfer_pb2.KvChunk(meta=meta.pack(), data=data)
            if item.chunk is None:
                return

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._stubs.values():
                channel.close()
            self._stubs.clear()


def _settle(transfer: OutgoingTransfer, call: grpc.Future) -> None:
    if call.cancelled():
        transfer.fail(TransferError(f"transfer of {transfer.dest.request_id} cancelled"))
        return
    error = call.exception()
    if error is not None:
        transfer.fail(TransferError(f"transfer of {transfer.dest.request_id} failed: {error.code().name}: {error.details()}"))
        return
    ack = call.result()
    if ack.ok:
        transfer.succeed()
    else:
        transfer.fail(TransferError(f"receiver refused {transfer.dest.request_id}: {ack.error}"))


class GrpcReceiver(KVReceiver):
    def __init__(
        self,
        kv: torch.Tensor,
        on_complete: CompletionCallback,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_concurrent: int = 16,
    ):
        self.table = ReceiveTable(kv, on_complete)
        self.server = grpc.server(ThreadPoolExecutor(max_workers=max_concurrent), options=_channel_options(max_message_bytes))
        kv_transfer_pb2_grpc.add_KvTransferServicer_to_server(_Servicer(self.table), self.server)
        bound = self.server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise RuntimeError(f"could not bind the KV receiver to {host}:{port}")
        self.server.start()
        self.address = f"{host}:{bound}"

    def expect(self, request_id: str, block_ids: list[int]) -> None:
        self.table.expect(request_id, block_ids)

    def cancel(self, request_id: str) -> None:
        self.table.cancel(request_id)

    def close(self) -> None:
        self.server.stop(grace=None)


class _Servicer(kv_transfer_pb2_grpc.KvTransferServicer):
    def __init__(self, table: ReceiveTable):
        self.table = table

    def Send(self, request_iterator, context):
        request_id = None
        try:
            for chunk in request_iterator:
                meta = ChunkMeta.unpack(chunk.meta)
                request_id = meta.request_id
                data = None
                if not meta.final:
                    self.table.check(meta)
                    if len(chunk.data) != meta.nbytes:
                        raise TransferError(f"chunk carries {len(chunk.data)} bytes, its metadata says {meta.nbytes}")
                    with warnings.catch_warnings():  # read-only bytes: we only read them
                        warnings.simplefilter("ignore", UserWarning)
                        data = torch.frombuffer(chunk.data, dtype=getattr(torch, meta.dtype)).to(self.table.kv.device)
                if self.table.accept(meta, data):
                    return kv_transfer_pb2.KvAck(ok=True)
            raise TransferError("the sender closed the stream before the final message")
        except TransferError as e:
            if request_id is not None:
                self.table.fail(request_id, str(e))
            return kv_transfer_pb2.KvAck(ok=False, error=str(e))
        except grpc.RpcError:  # the sender went away mid-stream
            if request_id is not None:
                self.table.fail(request_id, "the sender went away mid-transfer")
            raise

"""Hostile, broken and dead peers against kv_transfer, both backends, no Ray (the same with real
worker processes and signals: test_kv_transfer_faults.py).

Receiver side: every hostile message or connection is refused and counted by reason, never a
crash, a hang or a reservation left behind, and a real transfer afterwards is bit-exact.
Sender side: a dead or frozen receiver fails only the transfers bound for it."""

import dataclasses
import ipaddress
import os
import queue
import socket
import struct
import threading
import time

import grpc
import msgpack
import psutil
import pytest
import torch
from test_kv_transfer import LAYERS, SECRET, WAIT, Completions, pool, send

from kv_transfer import Destination, TransferError, make_receiver, make_sender, new_secret, torch_backend
from kv_transfer.auth import GrpcProver
from kv_transfer.base import KVSender, OutgoingChunk
from kv_transfer.grpc_backend import encode_chunk, encode_proof
from kv_transfer.link import Link, LinkClosed
from kv_transfer.wire import MAX_CHUNK_BYTES, ChunkMeta, checksum, gather
from protos import kv_transfer_pb2

DST, SRC = [10, 11], [1, 2]  # a reservation of two blocks, and where the sender's copy sits


@pytest.fixture(scope="module", params=["grpc", "nccl"])
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def ends(backend):
    src, dst = pool(), pool(fill=False)
    completions = Completions()
    receiver = make_receiver(backend, dst, completions, SECRET, timeout=15)
    sender = make_sender(backend, src, SECRET, timeout=15)
    yield src, dst, sender, receiver, completions
    sender.close()
    receiver.close()


@dataclasses.dataclass
class Forged(OutgoingChunk):
    """A chunk whose description is whatever the test says (the real sender's threads send it)."""

    forged: "ChunkMeta | RawMeta | None" = None

    def meta(self):
        return self.forged


@dataclasses.dataclass
class RawMeta:
    raw: bytes
    final: bool = True

    def pack(self) -> bytes:
        return self.raw


def honest(src, request_id, layers, blocks=(0, 2), first_token=-1):
    data = gather(src, (*layers, *blocks), torch.tensor(SRC + [3]))
    meta = ChunkMeta(request_id, layers, blocks, "float32", tuple(data.shape), data.numel() * 4, checksum(data), first_token)
    return meta, data


def send_forged(sender, receiver, request_id, chunks, expect=True):
    if expect:
        receiver.expect(request_id, DST)
    transfer = sender.start(Destination(receiver.address, request_id, tuple(DST)), SRC)
    for meta, data in chunks:
        transfer._submit(Forged(transfer, (0, 0, 0, 0), data, None, -1, forged=meta))
    return transfer.future


def scenario(name, src, rid):
    """(chunks, expect, reason): one hostile transfer as a broken or hostile prefill worker sends it.
    The bytes sent always match the metadata's byte count, or it is refused before they are read:
    gloo aborts the process on a message of another size than the one posted (deploy/README.md)."""
    whole, data = honest(src, rid, (0, LAYERS), first_token=5)
    first, first_data = honest(src, rid, (0, 2))
    last, last_data = honest(src, rid, (2, LAYERS), first_token=5)
    replace = dataclasses.replace
    return {
        "dtype": ([(replace(whole, dtype="float16"), data)], True, "layout"),
        "shape": ([(replace(whole, shape=(LAYERS, 2, 2, 16, 4, 4)), data)], True, "layout"),
        "nbytes vs shape": ([(replace(whole, nbytes=whole.nbytes * 2), torch.cat([data, data]))], True, "layout"),
        "oversized": ([(replace(whole, nbytes=1 << 40), data)], True, "oversized"),
        "out of range": ([honest(src, rid, (0, LAYERS), (0, 3), first_token=5)], True, "range"),
        "duplicate": ([(first, first_data), (first, first_data), (last, last_data)], True, "duplicate"),
        "last chunk early": ([(last, last_data)], True, "incomplete"),
        "checksum": ([(replace(whole, checksum=whole.checksum ^ 1), data)], True, "checksum"),
        "not expected": ([(whole, data)], False, "unexpected"),
        "garbage metadata": ([(RawMeta(b"\xc1\x00garbage"), data)], True, "malformed"),
        "metadata of another shape": ([(RawMeta(msgpack.packb({"request_id": rid, "layers": "x"})), data)], True, "malformed"),
    }[name]


def assert_still_serves(src, dst, sender, receiver, completions, tag):
    send(sender, receiver, f"after-{tag}", [20, 21, 22], [30, 31, 32]).result(WAIT)
    assert completions.wait(f"after-{tag}") == (7, None)
    assert torch.equal(dst[:, :, [30, 31, 32]], src[:, :, [20, 21, 22]])


def wait_for(predicate, what):
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def counted(receiver, before, reason):
    wait_for(lambda: receiver.failures().get(reason, 0) > before.get(reason, 0), f"no {reason!r} refusal counted")
    after = receiver.failures()
    return {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)}


@pytest.mark.parametrize(
    "name", ["dtype", "shape", "nbytes vs shape", "oversized", "out of range", "duplicate", "last chunk early", "checksum",
             "not expected", "garbage metadata", "metadata of another shape"],
)  # fmt: skip
def test_hostile_chunk_is_refused_counted_and_released(ends, name):
    src, dst, sender, receiver, completions = ends
    rid = f"hostile-{name}"
    chunks, expect, reason = scenario(name, src, rid)
    before = receiver.failures()
    future = send_forged(sender, receiver, rid, chunks, expect)
    with pytest.raises(TransferError):
        future.result(WAIT)
    assert counted(receiver, before, reason) == {reason: 1}
    if reason == "malformed":  # no request id to blame: the reservation waits for the router's abort (or expires)
        receiver.cancel(rid)
    assert rid not in receiver.table  # nothing left expecting it...
    if expect and reason != "malformed":  # ...and the decode worker was told, so it frees the reservation
        assert completions.wait(rid)[1]
    if name != "duplicate":  # (its first, honest chunk was written: the blocks are the request's until freed)
        assert not dst[:, :, DST].any()
    dst[:, :, DST] = 0
    assert_still_serves(src, dst, sender, receiver, completions, name.replace(" ", "-"))


def test_a_sender_without_the_secret_is_refused_and_counted(ends, backend):
    src, dst, sender, receiver, completions = ends
    before = receiver.failures()
    outsider = make_sender(backend, src, new_secret(), timeout=15)
    try:
        receiver.expect("outsider", DST)
        with pytest.raises(TransferError):
            outsider.start(Destination(receiver.address, "outsider", tuple(DST)), SRC).finish(1).result(WAIT)
    finally:
        outsider.close()
    assert counted(receiver, before, "unauthenticated") == {"unauthenticated": 1}
    assert not dst[:, :, DST].any()
    receiver.cancel("outsider")
    assert_still_serves(src, dst, sender, receiver, completions, "outsider")


def test_garbage_on_the_raw_socket_is_refused(ends, backend):
    src, dst, sender, receiver, completions = ends
    host, port = receiver.address.rsplit(":", 1)
    before = receiver.failures()
    for payload in (os.urandom(64), b"\x00" * 4096, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(256)):
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(payload)
            raw.settimeout(WAIT)
            try:
                while raw.recv(1 << 16):  # until the receiver hangs up
                    pass
            except ConnectionResetError:
                pass
    if backend == "nccl":  # grpc's HTTP/2 layer drops these before any handler sees them: nothing to count
        wait_for(lambda: receiver.failures().get("unauthenticated", 0) >= before.get("unauthenticated", 0) + 3, "not counted")
    assert_still_serves(src, dst, sender, receiver, completions, "garbage")


# --- the nccl backend's control link, message by message ------------------------------------------


def nccl_link(receiver) -> Link:
    return Link.connect(receiver.address, SECRET, timeout=WAIT)


@pytest.mark.parametrize(
    "frame, reason",
    [
        (msgpack.packb({"op": "bogus"}), "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (b"\xc1\xc1\xc1", "malformed"),
        (msgpack.packb({"op": "store", "cmd": "__init__", "args": []}), "malformed"),
        (None, "oversized"),  # a length no frame has
    ],
    ids=["unknown op", "not a map", "not msgpack", "unknown store command", "huge length"],
)
def test_nccl_link_refuses_out_of_protocol_frames(frame, reason):
    src, dst, completions = pool(), pool(fill=False), Completions()
    receiver = make_receiver("nccl", dst, completions, SECRET, timeout=15)
    sender = make_sender("nccl", src, SECRET, timeout=15)
    try:
        link = nccl_link(receiver)
        if frame is None:
            link.sock.sendall(struct.pack(">I", 1 << 30) + b"x" * 1024)
        else:
            link.sock.sendall(struct.pack(">I", len(frame)) + frame)
        with pytest.raises(LinkClosed):
            link.recv()  # the receiver hangs up
        link.close()
        assert counted(receiver, {}, reason) == {reason: 1}
        assert_still_serves(src, dst, sender, receiver, completions, "frames")
    finally:
        sender.close()
        receiver.close()


def test_nccl_connections_are_bounded_and_silent_ones_time_out(monkeypatch):
    """The handshake has HANDSHAKE_TIMEOUT in all: a connection dripping a byte at a time (each
    within the timeout) is dropped as surely as a silent one."""
    monkeypatch.setattr(torch_backend, "HANDSHAKE_TIMEOUT", 1.0)
    src, dst, completions = pool(), pool(fill=False), Completions()
    receiver = torch_backend.TorchDistReceiver(dst, completions, SECRET, timeout=15, max_pairs=2)
    sender = make_sender("nccl", src, SECRET, timeout=15)
    host, port = receiver.address.rsplit(":", 1)
    silent = [socket.create_connection((host, int(port))) for _ in range(3)]  # never prove anything
    stop = threading.Event()

    def drip():
        while not stop.wait(0.4):
            try:
                silent[1].send(b"x")
            except OSError:
                return

    threading.Thread(target=drip, daemon=True).start()
    try:
        wait_for(lambda: receiver.failures() == {"refused": 1, "unauthenticated": 2}, "the third was not refused, or the two never timed out")
        assert_still_serves(src, dst, sender, receiver, completions, "silent")
    finally:
        stop.set()
        for s in silent:
            s.close()
        sender.close()
        receiver.close()


def test_a_failure_receiving_drops_the_pair_not_the_worker(monkeypatch):
    """Anything but a TransferError in the receiving thread (out of memory, a bug) closes the
    pair's link, so its sender fails the transfer at once and the next one makes a new pair."""
    real, failures = torch_backend._PairReceiver._chunk, []

    def fails_once(self, *args):
        if not failures:
            failures.append(1)
            raise MemoryError("no room for the chunk")
        return real(self, *args)

    monkeypatch.setattr(torch_backend._PairReceiver, "_chunk", fails_once)
    src, dst, completions = pool(), pool(fill=False), Completions()
    receiver = make_receiver("nccl", dst, completions, SECRET, timeout=15)
    sender = make_sender("nccl", src, SECRET, timeout=15)
    try:
        with pytest.raises(TransferError):
            send(sender, receiver, "unlucky", SRC, DST).result(WAIT)
        assert receiver.failures() == {"internal": 1}
        receiver.cancel("unlucky")
        assert_still_serves(src, dst, sender, receiver, completions, "internal")
    finally:
        sender.close()
        receiver.close()


def test_the_rendezvous_store_answers_a_peers_bad_values_with_errors():
    """Its values are bytes or text (an int n would be bytes(n): n bytes allocated), and a wait's
    timeout of any type or size is an error or clamped, never an exception in the pair's thread."""
    store = torch_backend._PairStore(timeout=0.2)
    assert "error" in store.serve({"op": "store", "cmd": "set", "args": ["k", 200_000_000]})
    assert "error" in store.serve({"op": "store", "cmd": "compare_set", "args": ["k", b"", 100_000_000]})
    for timeout in ([1], 1e300, float("nan"), -5):
        assert "error" in store.serve({"op": "store", "cmd": "wait", "args": [["absent"], timeout]}), timeout
    assert store.num_keys() == 0
    assert store.serve({"op": "store", "cmd": "set", "args": ["k", b"v"]}) == {"op": "store", "value": None}


# --- the grpc backend's stream, message by message ----------------------------------------------------


def grpc_stream(receiver, messages, prover=None, first=None, sent=None):
    """A raw stream: the prover's nonce, then (once the receiver has proved the secret) its answer,
    or `first` instead, ahead of the messages; no prover: no handshake at all. `sent` collects
    the first message."""
    channel = grpc.insecure_channel(receiver.address)
    method = channel.stream_stream("/pdserve.v1.KvTransfer/Transfer", request_serializer=None,
                                   response_deserializer=kv_transfer_pb2.KvAck.FromString)  # fmt: skip
    head = queue.Queue(1)

    def requests():
        if (message := head.get()) is not None:
            yield message
        yield from messages

    try:
        call = method(requests(), metadata=prover.metadata if prover else (), timeout=WAIT)
        message = None
        try:
            if first is not None:
                message = first
            elif prover is not None:
                message = encode_proof(prover.answer(call.initial_metadata()))
        finally:
            head.put(message)
        if sent is not None:
            sent.append(message)
        return list(call)
    finally:
        channel.close()


@pytest.mark.parametrize(
    "messages, handshake, code, reason",
    [
        ([encode_chunk((b"", memoryview(b"")))], None, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
        ([], "garbage", grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
        ([], "replayed", grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
        ([b"\x1a\x01x"], "proved", grpc.StatusCode.INVALID_ARGUMENT, "malformed"),  # field 3 after the proof
        ([b"\x0a\x05ab"], "proved", grpc.StatusCode.INVALID_ARGUMENT, "malformed"),  # truncated
        ([b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"], "proved", grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    ],
    ids=["no handshake", "garbage for a proof", "a replayed proof", "a proof where a chunk goes", "truncated", "runaway varint"],
)
def test_grpc_stream_refuses_bad_proofs_and_bad_bytes(messages, handshake, code, reason):
    """A stream proves the secret afresh: the nonce and proof a listener saw on another stream
    are refused (the receiver's challenge is new each time)."""
    src, dst, completions = pool(), pool(fill=False), Completions()
    receiver = make_receiver("grpc", dst, completions, SECRET, timeout=15)
    sender = make_sender("grpc", src, SECRET, timeout=15)
    try:
        prover, first = (None, None) if handshake is None else (GrpcProver(SECRET), None)
        if handshake == "garbage":
            first = encode_proof(os.urandom(32))
        elif handshake == "replayed":  # an honest stream's nonce and proof, sent again
            sent = []
            assert grpc_stream(receiver, [], prover, sent=sent) == []
            first = sent[0]
        with pytest.raises(grpc.RpcError) as error:
            grpc_stream(receiver, messages, prover, first)
        assert error.value.code() == code
        assert receiver.failures() == {reason: 1}
        assert_still_serves(src, dst, sender, receiver, completions, "stream")
    finally:
        sender.close()
        receiver.close()


def test_a_grpc_stream_that_never_proves_the_secret_is_dropped(monkeypatch):
    """Its thread is the receiver's (max_senders of them): silence past HANDSHAKE_TIMEOUT ends it."""
    monkeypatch.setattr("kv_transfer.grpc_backend.HANDSHAKE_TIMEOUT", 0.5)
    src, dst, completions = pool(), pool(fill=False), Completions()
    receiver = make_receiver("grpc", dst, completions, SECRET, timeout=15)
    sender = make_sender("grpc", src, SECRET, timeout=15)
    release = threading.Event()

    def silent():
        release.wait(WAIT)
        yield from ()

    channel = grpc.insecure_channel(receiver.address)
    method = channel.stream_stream("/pdserve.v1.KvTransfer/Transfer", request_serializer=None,
                                   response_deserializer=kv_transfer_pb2.KvAck.FromString)  # fmt: skip
    try:
        with pytest.raises(grpc.RpcError) as error:
            list(method(silent(), metadata=GrpcProver(SECRET).metadata, timeout=WAIT))
        assert error.value.code() == grpc.StatusCode.CANCELLED
        wait_for(lambda: receiver.failures() == {"unauthenticated": 1}, f"not counted: {receiver.failures()}")  # counted after the cancel
        assert_still_serves(src, dst, sender, receiver, completions, "silent")
    finally:
        release.set()
        channel.close()
        sender.close()
        receiver.close()


# --- independence: a stalled pair holds up only itself ------------------------------------------------


class StalledPair(torch_backend._PairSender):
    """Announces each chunk, never sends its bytes: the receiver waits on this pair's group."""

    def _send(self, group, item):
        self.link.send({"op": "chunk", "meta": item.meta().pack()})


def test_a_stalled_sender_holds_up_no_other_pair(backend):
    src, dst, completions = pool(), pool(fill=False), Completions()
    receiver = make_receiver(backend, dst, completions, SECRET, timeout=15)
    good = make_sender(backend, src, SECRET, timeout=15)
    if backend == "nccl":
        # The receiver's 15 s receive timeout runs out first (the stalled side would wait 60 s): the
        # receiver drops the pair and counts it, which fails the stalled transfer on its side.
        stalled = KVSender(src, lambda address: StalledPair(address, src.device, SECRET, 60), MAX_CHUNK_BYTES)
        receiver.expect("stalled", [40, 41])
        stuck = stalled.start(Destination(receiver.address, "stalled", (40, 41)), [1, 2]).finish(9)
    else:  # a stream that opens, proves the secret and sends nothing
        release = threading.Event()

        def quiet():
            release.wait()
            yield from ()

        stuck = threading.Thread(target=_swallow, args=(grpc_stream, receiver, quiet(), GrpcProver(SECRET)))
        stuck.start()
    try:
        for i in range(4):
            send(good, receiver, f"beside-{i}", [8 + i], [50 + i]).result(WAIT)
            assert torch.equal(dst[:, :, 50 + i], src[:, :, 8 + i])
        if backend == "nccl":
            assert not stuck.done()  # still waiting on its own pair
            with pytest.raises(TransferError):
                stuck.result(WAIT)
            wait_for(lambda: receiver.failures() == {"channel": 1}, f"the stalled pair was not dropped: {receiver.failures()}")
            assert "stalled" not in receiver.table
            stalled.close()
    finally:
        if backend == "grpc":
            release.set()
            stuck.join(WAIT)
        good.close()
        receiver.close()


def _swallow(fn, *args):
    try:
        fn(*args)
    except grpc.RpcError:
        pass


def test_a_dead_or_frozen_receiver_holds_up_only_its_transfers(backend):
    """start() never waits for a channel: with one receiver unreachable (nothing listening) and one
    frozen (its kernel accepts, the process never answers), transfers to a live one go on."""
    src, dst, completions = pool(), pool(fill=False), Completions()
    live = make_receiver(backend, dst, completions, SECRET, timeout=15)
    frozen = socket.create_server(("127.0.0.1", 0))
    dead = socket.create_server(("127.0.0.1", 0))
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    sender = make_sender(backend, src, SECRET, timeout=8)
    try:
        to_frozen = sender.start(Destination(f"127.0.0.1:{frozen.getsockname()[1]}", "f", (1,)), [1])
        to_dead = sender.start(Destination(dead_address, "d", (1,)), [1])
        to_frozen.layers_done(LAYERS)
        to_dead.layers_done(LAYERS)
        frozen_done, dead_done = to_frozen.finish(1), to_dead.finish(1)
        for i in range(4):
            send(sender, live, f"live-{i}", [8 + i], [50 + i]).result(WAIT)
        assert not frozen_done.done()  # the frozen peer's own transfer still waits for its deadline...
        for future in (dead_done, frozen_done):  # ...and, like the dead one's, fails in the end
            with pytest.raises(TransferError):
                future.result(WAIT)
        with pytest.raises(TransferError, match="UNAVAILABLE" if backend == "grpc" else "."):  # why: nothing listens, not a bad proof
            dead_done.result(0)
        send(sender, live, "live-after", [3], [60]).result(WAIT)
    finally:
        sender.close()
        live.close()
        frozen.close()


def ipv4(ip: str) -> str:
    """grpc listens on 127.0.0.1 through an IPv6 socket: ::ffff:127.0.0.1 is the same address."""
    address = ipaddress.ip_address(ip)
    return str(getattr(address, "ipv4_mapped", None) or address)


def test_receivers_listen_only_on_their_address():
    """Every socket the transfer opens for listening (receiver, gloo on both ends) is on loopback."""
    me = psutil.Process()
    listening = lambda: {c.laddr for c in me.net_connections("tcp") if c.status == psutil.CONN_LISTEN}  # noqa: E731
    before = listening()
    ends = []
    for backend in ("nccl", "grpc"):
        src, dst, completions = pool(), pool(fill=False), Completions()
        receiver, sender = make_receiver(backend, dst, completions, SECRET), make_sender(backend, src, SECRET)
        ends += [receiver, sender]
        send(sender, receiver, "l", [1], [2]).result(WAIT)
    try:
        new = listening() - before
        assert len(new) >= 4  # two receivers, and a gloo device at each end of the pair
        assert {ipv4(a.ip) for a in new} == {"127.0.0.1"}, new
    finally:
        for end in ends:
            end.close()

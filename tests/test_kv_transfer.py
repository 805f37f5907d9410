"""kv_transfer on its own (no Ray): both backends, sender and receiver in this process.

Where the pools live decides what runs: grpc between pools on the GPU where there is one (the
CUDA-event gathers and device checksums), nccl over gloo between CPU pools everywhere, and over
NCCL between two GPUs where there are two (NCCL puts each rank on a GPU of its own)."""

import dataclasses
import socket
import threading
import time

import pytest
import torch

from kv_transfer import Destination, TransferError, make_receiver, make_sender, new_secret
from kv_transfer.base import OutgoingChunk
from kv_transfer.wire import ChunkMeta, KVLayout, checksum, device_checksum, plan_chunks

GPUS = torch.cuda.device_count()
GPU = "cuda:0" if GPUS else "cpu"
SETUPS = {  # name: (backend, sender's pool device, receiver's pool device)
    "grpc": ("grpc", GPU, "cuda:1" if GPUS > 1 else GPU),
    "nccl-gloo": ("nccl", "cpu", "cpu"),
    "nccl-cuda": ("nccl", "cuda:0", "cuda:1"),
}
NEEDS_TWO_GPUS = pytest.mark.skipif(GPUS < 2, reason=f"the NCCL path pairs two GPUs and this machine has {GPUS}: "
                                                      f"the nccl backend ran over gloo between CPU pools only")  # fmt: skip
LAYERS, BLOCK, HEADS, DIM = 4, 16, 2, 8
WAIT = 20  # seconds any single test waits for a result
SECRET = new_secret()


def pool(num_blocks=64, dtype=torch.float32, heads=HEADS, fill=True, device="cpu"):
    shape = (LAYERS, 2, num_blocks, BLOCK, heads, DIM)
    return (torch.randn(shape).to(dtype) if fill else torch.zeros(shape, dtype=dtype)).to(device)


class Completions:
    def __init__(self):
        self.done: dict[str, tuple[int, str | None]] = {}
        self.logprobs: dict[str, tuple | None] = {}
        self.event = threading.Condition()

    def __call__(self, request_id, first_token, error, first_logprobs):
        with self.event:
            self.done[request_id] = (first_token, error)
            self.logprobs[request_id] = first_logprobs
            self.event.notify_all()

    def wait(self, request_id):
        with self.event:
            assert self.event.wait_for(lambda: request_id in self.done, timeout=WAIT), f"{request_id} never completed"
            return self.done[request_id]


@pytest.fixture(scope="module", params=["grpc", "nccl-gloo", pytest.param("nccl-cuda", marks=NEEDS_TWO_GPUS)])
def setup(request):
    return SETUPS[request.param]


@pytest.fixture(scope="module")
def backend(setup):
    return setup[0]


@pytest.fixture(scope="module")
def shared_link(setup):
    """A sender pool, a receiver pool, and the two ends of the chosen backend, kept for the
    module like a worker pair keeps its channel (building many in one process only tests
    how fast the OS hands out sockets)."""
    backend, src_device, dst_device = setup
    src, dst = pool(device=src_device), pool(fill=False, device=dst_device)
    completions = Completions()
    receiver = make_receiver(backend, dst, completions, SECRET, timeout=15)
    sender = make_sender(backend, src, SECRET, timeout=15)
    yield src, dst, sender, receiver, completions
    sender.close()
    receiver.close()


@pytest.fixture
def link(shared_link):
    src, dst, sender, receiver, completions = shared_link
    dst.zero_()
    return shared_link


def same(a, b) -> bool:
    return torch.equal(a.cpu(), b.cpu())


def send(sender, receiver, request_id, src_blocks, dst_blocks, first_token=7, layer_wise=True, first_logprobs=None):
    receiver.expect(request_id, dst_blocks)
    transfer = sender.start(Destination(receiver.address, request_id, tuple(dst_blocks)), src_blocks)
    if layer_wise:
        for layer in range(1, LAYERS + 1):
            transfer.layers_done(layer)
    return transfer.finish(first_token, first_logprobs)


@pytest.mark.parametrize("num_blocks", [1, 3, 17, 40])
def test_round_trip_is_bit_exact(link, num_blocks):
    src, dst, sender, receiver, completions = link
    g = torch.Generator().manual_seed(num_blocks)
    src_blocks = torch.randperm(64, generator=g)[:num_blocks].tolist()
    dst_blocks = torch.randperm(64, generator=g)[:num_blocks].tolist()
    send(sender, receiver, f"r{num_blocks}", src_blocks, dst_blocks, first_token=num_blocks).result(WAIT)
    assert completions.wait(f"r{num_blocks}") == (num_blocks, None)
    assert same(dst[:, :, dst_blocks], src[:, :, src_blocks])
    untouched = sorted(set(range(64)) - set(dst_blocks))
    assert not dst[:, :, untouched].any()


def test_the_first_tokens_logprobs_ride_on_the_last_chunk(link):
    src, dst, sender, receiver, completions = link
    logprobs = (-0.25, ((7, -0.25), (3, -1.5)), 1)
    send(sender, receiver, "lp", [1, 2], [3, 4], first_logprobs=logprobs).result(WAIT)
    send(sender, receiver, "no-lp", [1, 2], [5, 6]).result(WAIT)
    assert completions.wait("lp") == (7, None) and completions.logprobs["lp"] == logprobs
    assert completions.wait("no-lp") == (7, None) and completions.logprobs["no-lp"] is None


def test_concurrent_requests_on_one_link(link):
    src, dst, sender, receiver, completions = link
    futures = [send(sender, receiver, f"c{i}", list(range(i * 8, i * 8 + 5)), list(range(56 - i * 8, 61 - i * 8)))
               for i in range(4)]  # fmt: skip
    for f in futures:
        f.result(WAIT)
    for i in range(4):
        assert same(dst[:, :, 56 - i * 8 : 61 - i * 8], src[:, :, i * 8 : i * 8 + 5])


def test_expect_rejects_blocks_outside_the_pool(link):
    src, dst, sender, receiver, completions = link
    with pytest.raises(ValueError, match="outside the pool"):
        receiver.expect("oob", [3, 64])


def test_corrupted_chunk_is_caught_by_the_checksum(link, monkeypatch):
    src, dst, sender, receiver, completions = link
    honest_meta = OutgoingChunk.meta

    def meta_then_corrupt(self):
        meta = honest_meta(self)
        if self.data is not None:  # flip one byte after the checksum was taken
            self.data = self.data.clone()
            self.data.view(-1).view(torch.uint8)[5] ^= 0x10
        return meta

    monkeypatch.setattr(OutgoingChunk, "meta", meta_then_corrupt)
    future = send(sender, receiver, "bad", [1, 2, 3], [4, 5, 6])
    with pytest.raises(TransferError, match="checksum mismatch"):
        future.result(WAIT)
    first_token, error = completions.wait("bad")
    assert "checksum mismatch" in error


@pytest.mark.parametrize("mismatch", ["dtype", "heads"])
def test_layout_mismatch_is_a_clear_error(setup, mismatch):
    backend, src_device, dst_device = setup
    src = pool(device=src_device)
    dst = pool(dtype=torch.float16, fill=False, device=dst_device) if mismatch == "dtype" else pool(heads=HEADS * 2, fill=False, device=dst_device)
    completions = Completions()
    receiver, sender = make_receiver(backend, dst, completions, SECRET, timeout=15), make_sender(backend, src, SECRET, timeout=15)
    try:
        future = send(sender, receiver, "m", [0, 1], [2, 3])
        with pytest.raises(TransferError, match="dtype mismatch" if mismatch == "dtype" else "does not match this pool"):
            future.result(WAIT)
    finally:
        sender.close()
        receiver.close()


def test_unexpected_request_is_refused(link):
    src, dst, sender, receiver, completions = link
    transfer = sender.start(Destination(receiver.address, "nobody", (1, 2)), [1, 2])
    with pytest.raises(TransferError, match="no transfer expected"):
        transfer.finish(3).result(WAIT)
    # the link still works afterwards
    send(sender, receiver, "after", [9], [10]).result(WAIT)
    assert same(dst[:, :, 10], src[:, :, 9])


def test_receiver_cancel_refuses_the_rest(link):
    src, dst, sender, receiver, completions = link
    receiver.expect("gone", [1, 2])
    transfer = sender.start(Destination(receiver.address, "gone", (1, 2)), [3, 4])
    transfer.layers_done(1)
    receiver.cancel("gone")
    with pytest.raises(TransferError):
        transfer.finish(1).result(WAIT)


def test_sender_cancel_settles_the_future(link):
    src, dst, sender, receiver, completions = link
    receiver.expect("x", [1])
    transfer = sender.start(Destination(receiver.address, "x", (1,)), [2])
    transfer.cancel()
    with pytest.raises(TransferError, match="cancelled"):
        transfer.future.result(WAIT)


def test_a_channel_times_out_on_silence_not_on_the_length_of_its_queue():
    """Transfers queued behind one another, each answered well within the timeout but all of them
    together taking longer, go through; once answers stop, what is in flight fails. Answers for
    requests not in flight (a broken or hostile peer's) are no sign of life."""
    from kv_transfer.base import OutgoingTransfer, SenderChannel

    channel = SenderChannel("peer:1", timeout=0.6)
    transfers = [OutgoingTransfer(pool(), Destination("peer:1", f"q{i}", (1,)), [1], 1 << 20, lambda chunk: None) for i in range(5)]
    try:
        for transfer in transfers:
            channel.track(transfer)
        for transfer in transfers[:4]:  # 4 x 0.3 s: twice the timeout in all
            time.sleep(0.3)
            channel.settle(transfer.dest.request_id, True, "")
        assert all(t.future.result(0) is None for t in transfers[:4]) and not channel.broken
        stop = threading.Event()

        def unknown_answers():
            while not stop.wait(0.2):
                channel.settle("no-such-request", True, "")

        threading.Thread(target=unknown_answers, daemon=True).start()
        with pytest.raises(TransferError, match="not acknowledged within 1s"):
            transfers[4].future.result(WAIT)
        assert channel.broken
    finally:
        stop.set()
        channel.close()


def test_grpc_peer_that_never_answers_times_out():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never speaks HTTP/2
    sender = make_sender("grpc", pool(), SECRET, timeout=1.5)
    try:
        transfer = sender.start(Destination(f"127.0.0.1:{silent.getsockname()[1]}", "t", (1,)), [1])
        transfer.layers_done(LAYERS)
        start = time.monotonic()
        with pytest.raises(TransferError, match="not acknowledged within 2s|UNAVAILABLE"):
            transfer.finish(1).result(WAIT)
        assert time.monotonic() - start < WAIT
    finally:
        sender.close()
        silent.close()


def test_nccl_peer_that_never_answers_times_out():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never starts the handshake
    sender = make_sender("nccl", pool(), SECRET, timeout=1.5)
    try:
        transfer = sender.start(Destination(f"127.0.0.1:{silent.getsockname()[1]}", "t", (1,)), [1])
        with pytest.raises(TransferError, match="not acknowledged within 2s|handshake not completed"):
            transfer.finish(1).result(WAIT)
    finally:
        sender.close()
        silent.close()


def test_closing_the_sender_fails_what_is_in_flight(setup):
    backend, src_device, _ = setup
    frozen = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: nothing would settle the transfer
    sender = make_sender(backend, pool(device=src_device), SECRET, timeout=WAIT * 3)  # nor would its deadline, within the test
    try:
        future = sender.start(Destination(f"127.0.0.1:{frozen.getsockname()[1]}", "c", (1,)), [1]).finish(1)
        sender.close()
        with pytest.raises(TransferError, match="closed"):
            future.result(WAIT)
    finally:
        frozen.close()


def test_chunks_leave_as_layers_finish(link):
    """Layer-wise pipelining: chunks arrive before finish() is called."""
    src, dst, sender, receiver, completions = link
    receiver.expect("lw", list(range(40)))  # 40 blocks x 4 KiB = 160 KiB per layer: groups of layers
    transfer = sender.start(Destination(receiver.address, "lw", tuple(range(40))), list(range(40, 80 - 16)) + list(range(16)))
    transfer.chunks = [(l, l + 1, 0, 40) for l in range(LAYERS)]  # one chunk per layer, to watch them go
    transfer.layers_done(2)
    deadline = time.monotonic() + WAIT
    while not dst[:2, :, :40].any(dim=(1, 2, 3, 4, 5)).all() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dst[:2, :, :40].any(dim=(1, 2, 3, 4, 5)).all() and not dst[2:].any()
    transfer.finish(1).result(WAIT)
    assert dst[2:, :, :40].any()


def test_plan_coalesces_small_layers_and_splits_huge_ones():
    layout = KVLayout(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype="float32")
    per_block = layout.bytes_per_layer_block  # 24 KiB
    assert plan_chunks(layout, 4, max_bytes=64 << 20) == [(l, min(l + 11, 30), 0, 4) for l in range(0, 30, 11)]
    assert plan_chunks(layout, 100, max_bytes=64 << 20)[0] == (0, 1, 0, 100)  # 2.4 MB per layer: one each
    split = plan_chunks(layout, 100, max_bytes=per_block * 30)
    assert split[:4] == [(0, 1, 0, 30), (0, 1, 30, 60), (0, 1, 60, 90), (0, 1, 90, 100)] and len(split) == 120


def test_metadata_is_msgpack_and_validated():
    meta = ChunkMeta("r", (0, 2), (0, 3), "float32", (2, 2, 3, 16, 2, 8), 12288, 123)
    assert ChunkMeta.unpack(meta.pack()) == meta
    last = dataclasses.replace(meta, first_token=5, first_logprobs=(-0.5, ((5, -0.5), (9, -2.0)), 1))
    assert ChunkMeta.unpack(last.pack()) == last
    with pytest.raises(TransferError, match="malformed"):
        ChunkMeta.unpack(b"\x93\x01\x02")
    with pytest.raises(TransferError, match="malformed"):
        ChunkMeta.unpack(dataclasses.replace(last, first_logprobs=(-0.5, ((5,),))).pack())
    assert b"pickle" not in meta.pack() and meta.pack()[:1] != b"\x80"  # not a pickle stream


def test_checksums_see_every_byte():
    t = torch.randn(1000)
    u = t.clone()
    u.view(torch.uint8)[1234] ^= 1
    assert checksum(t) != checksum(u)
    assert device_checksum(t) != device_checksum(u) and device_checksum(t) == device_checksum(t.clone())


class _LazyGroup:
    """A gloo pair group that, like NCCL, uses its rendezvous store again at its first send or
    receive, after the constructor has returned, and only through C++ (as NCCL does)."""

    def __init__(self, group, store_from_cpp, rank: int):
        self.group, self.store, self.rank, self.formed = group, store_from_cpp, rank, False

    def _form(self):
        if not self.formed:
            self.store.set(f"formed-{self.rank}", b"1")
            self.formed = True

    def send(self, *args):
        self._form()
        return self.group.send(*args)

    def recv(self, *args):
        self._form()
        return self.group.recv(*args)


def test_a_group_that_forms_at_its_first_send_finds_its_store_alive(monkeypatch):
    """NCCL forms its communicator at the first send, through the store its group was given, when
    nothing in Python may hold that store any more (a Python store whose Python half is gone answers
    'Not implemented' from C++: seen on an H100). Gloo forms in its constructor, so the CPU suite
    never saw it: the group here forms late, like NCCL."""
    import torch.distributed as dist

    from kv_transfer import torch_backend

    made = torch_backend.make_pair_group

    def lazy(store, rank, *args):
        # Only C++ holds the store past this call: the PrefixStore keeps the C++ object, not its Python half.
        return _LazyGroup(made(store, rank, *args), dist.PrefixStore("lazy", store), rank)

    monkeypatch.setattr(torch_backend, "make_pair_group", lazy)
    src, dst, completions = pool(), pool(fill=False), Completions()
    receiver = make_receiver("nccl", dst, completions, SECRET, timeout=15)
    sender = make_sender("nccl", src, SECRET, timeout=15)
    try:
        send(sender, receiver, "late", [1, 2], [3, 4]).result(WAIT)
        assert completions.wait("late") == (7, None) and same(dst[:, :, [3, 4]], src[:, :, [1, 2]])
    finally:
        sender.close()
        receiver.close()

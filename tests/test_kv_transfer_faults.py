"""KV transfer between real worker processes (Ray actors driven directly: reserve on a decode
worker, prefill with that destination), both backends, with real signals:

- a decode worker SIGKILLed, or frozen with SIGSTOP: prefills bound for a live one keep completing
  (long before the transfer timeout) while the one bound for the dead or frozen peer waits or fails;
- the decode worker's KV receiver listens on loopback only, refuses (and counts) a connection
  without the cluster's secret, refuses a first token outside the vocabulary, and keeps serving;
- after every scenario, zero KV blocks in use and the invariant checks pass.

The grpc pair's pools live where the engine puts them (a GPU where there is one); the nccl pair's on
the CPU (gloo, the same code): NCCL needs a GPU per rank, and these actors take none.
tests/test_kv_transfer.py runs NCCL between two GPUs."""

import dataclasses
import os
import signal
import socket
import time

import grpc
import pytest
import ray
import torch

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from kv_transfer import Destination, make_sender, new_secret
from kv_transfer.auth import GrpcProver
from prefill_worker.worker import PrefillWorker
from protos import kv_transfer_pb2

TRANSFER_TIMEOUT = 60.0  # every prefill to a live worker below completes long before a transfer could time out
WAIT = 45  # seconds any one call may take here (a loaded 2-core machine), still under the timeout
PARAMS = {"temperature": 0.0, "max_tokens": 2}


def actor(cls, *args, **kwargs):
    return ray.remote(cls).options(num_cpus=0, max_restarts=0).remote(*args, **kwargs)


def pid_of(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=WAIT)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return EngineConfig(model=tiny_model, num_kv_blocks=64, max_model_len=256)


@pytest.fixture(scope="module", params=["grpc", "nccl"])
def workers(request, ray_local, engine):
    """A prefill worker and a live decode worker; victims are made per test with `decode_worker`."""
    backend, secret = request.param, new_secret()
    config = engine if backend == "grpc" else dataclasses.replace(engine, device="cpu")

    def decode_worker(name):
        return actor(DecodeWorker, name, config, "decode", backend, TRANSFER_TIMEOUT, "127.0.0.1", 1, kv_secret=secret)

    prefill = actor(PrefillWorker, "prefill", config, backend, TRANSFER_TIMEOUT, 1, kv_secret=secret)
    live = decode_worker("live")
    ray.get([prefill.ready.remote(), live.ready.remote()], timeout=120)
    yield backend, secret, prefill, live, decode_worker
    for handle in (prefill, live):
        ray.get(handle.shutdown.remote(), timeout=WAIT)
        ray.kill(handle)


def reserve(decode, request_id, prompt):
    dest = ray.get(decode.reserve.remote(request_id, prompt, PARAMS), timeout=WAIT)
    assert dest is not None
    return dest


def prefill_to(prefill, dest, request_id, prompt):
    return prefill.prefill.remote(request_id, prompt, PARAMS, dest)


def prompt(i: int) -> list[int]:
    return [3 + (i * 7 + j) % 400 for j in range(20 + i % 30)]  # 2-4 blocks, all different


def assert_all_free(*handles):
    """Every block back in its pool (decodes finish first) and the invariants hold."""
    deadline = time.monotonic() + WAIT
    for handle in handles:
        while (in_use := ray.get(handle.stats.remote(), timeout=WAIT)["kv_blocks"]["in_use"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert in_use == 0, f"{in_use} blocks still in use"
        assert ray.get(handle.check_invariants.remote(), timeout=WAIT) == 0


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_prefills_for_a_live_decode_worker_go_on_beside_a_dead_or_frozen_one(workers, fault):
    backend, secret, prefill, live, decode_worker = workers
    victim = decode_worker(f"victim-{fault}")
    ray.get(victim.ready.remote(), timeout=120)
    if fault == "SIGKILL":  # an established pair whose peer dies
        assert isinstance(ray.get(prefill_to(prefill, reserve(victim, "warm", prompt(0)), "warm", prompt(0)), timeout=WAIT)["first_token"], int)
    # SIGSTOP: the first contact comes after the freeze, so opening the pair itself hangs
    doomed_dest = reserve(victim, "doomed", prompt(1))
    pid = pid_of(victim)
    os.kill(pid, getattr(signal, fault))
    try:
        doomed = prefill_to(prefill, doomed_dest, "doomed", prompt(1))
        done = [ray.get(prefill_to(prefill, reserve(live, f"live-{fault}-{i}", prompt(i)), f"live-{fault}-{i}", prompt(i)), timeout=WAIT)
                for i in range(2, 8)]  # fmt: skip
        assert all(isinstance(answer["first_token"], int) for answer in done)
        if fault == "SIGSTOP":
            assert not ray.wait([doomed], timeout=0)[0], "the transfer to the frozen peer settled while it was frozen"
        else:
            with pytest.raises(ray.exceptions.RayTaskError, match="TransferError"):
                ray.get(doomed, timeout=WAIT)
    finally:
        if fault == "SIGSTOP":
            os.kill(pid, signal.SIGCONT)
    if fault == "SIGSTOP":  # resumed: the transfer goes through, or fails at its deadline; either way it ends
        try:
            ray.get(doomed, timeout=TRANSFER_TIMEOUT + WAIT)
        except ray.exceptions.RayTaskError as e:
            assert "TransferError" in str(e)
        ray.get(victim.abort.remote("doomed"), timeout=WAIT)
        assert_all_free(victim)
        ray.get(victim.shutdown.remote(), timeout=WAIT)
    ray.kill(victim)
    assert_all_free(prefill, live)


def test_receiver_listens_on_loopback_only_and_refuses_outsiders(workers):
    backend, secret, prefill, live, _ = workers
    dest = reserve(live, "listen", prompt(40))
    ray.get(prefill_to(prefill, dest, "listen", prompt(40)), timeout=WAIT)  # a pair is up (gloo listens at both ends)

    def ray_port(self):  # the worker's own Ray RPC port (Ray's, inside Ray's trust boundary)
        from ray.core.generated import common_pb2

        address = common_pb2.Address()
        address.ParseFromString(ray._private.worker.global_worker.core_worker.get_owner_address(ray.put(0)))
        return address.port

    for handle in (live, prefill):  # every listening socket of the process but Ray's own: receiver, gloo, grpc
        listening = listening_of(handle)
        ours = {a for a in listening if a.port != ray.get(handle.__ray_call__.remote(ray_port), timeout=WAIT)}
        assert {a.ip.removeprefix("::ffff:") for a in ours} <= {"127.0.0.1"}, listening  # the prefill side may have none (grpc)
    host, port = dest["address"].rsplit(":", 1)
    assert (host, int(port)) in {(a.ip.removeprefix("::ffff:"), a.port) for a in listening_of(live)}

    # From outside, without the secret: raw bytes, then (grpc) a well-formed stream without the token.
    before = ray.get(live.stats.remote(), timeout=WAIT)["receive_failures"]
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(os.urandom(128))
        raw.settimeout(WAIT)
        try:
            while raw.recv(4096):
                pass
        except ConnectionResetError:
            pass
    if backend == "grpc":
        with grpc.insecure_channel(dest["address"]) as channel:
            call = channel.stream_stream("/pdserve.v1.KvTransfer/Transfer", request_serializer=None,
                                         response_deserializer=kv_transfer_pb2.KvAck.FromString)  # fmt: skip
            with pytest.raises(grpc.RpcError) as error:
                list(call(iter([b"\x0a\x00"]), metadata=GrpcProver(new_secret()).metadata, timeout=WAIT))  # a chunk, no proof
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    deadline = time.monotonic() + WAIT
    while (after := ray.get(live.stats.remote(), timeout=WAIT)["receive_failures"]).get("unauthenticated", 0) <= before.get(
        "unauthenticated", 0
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after["unauthenticated"] == before.get("unauthenticated", 0) + 1

    # Exported as a metric by reason, beside the prefill side's failures ("send").
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from router.metrics import Metrics

    metrics = Metrics()
    metrics.workers = [{**ray.get(h.stats.remote(), timeout=WAIT), "state": "ready"} for h in (prefill, live)]
    (family,) = [f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode()) if f.name == "pdserve_kv_transfer_failures"]
    exported = {(s.labels["worker"], s.labels["reason"]): s.value for s in family.samples}
    assert exported[("live", "unauthenticated")] == after["unauthenticated"] and ("prefill", "send") in exported

    # Still serving real transfers.
    assert isinstance(ray.get(prefill_to(prefill, reserve(live, "after", prompt(41)), "after", prompt(41)), timeout=WAIT)["first_token"], int)
    assert_all_free(prefill, live)


def listening_of(handle):
    import psutil

    return {c.laddr for c in psutil.Process(pid_of(handle)).net_connections("inet") if c.status == psutil.CONN_LISTEN}


def test_a_first_token_outside_the_vocabulary_is_refused_not_decoded(workers):
    """A peer that holds the secret but sends nonsense (here: a token id the model has no row for)
    gets a refusal, counted; the decode worker stays up and frees the reservation."""
    backend, secret, prefill, live, _ = workers
    def pool_like(self):  # the receiver's KV pool: its shape, dtype and device (a GPU's for grpc where there is one)
        kv = self.engine.kv_cache.kv
        return tuple(kv.shape), kv.dtype, kv.device.type

    shape, dtype, device = ray.get(live.__ray_call__.remote(pool_like), timeout=WAIT)
    sender = make_sender(backend, torch.randn(shape).to(device, dtype), secret, timeout=TRANSFER_TIMEOUT)
    try:
        dest = reserve(live, "nonsense", prompt(50))
        transfer = sender.start(Destination(dest["address"], "nonsense", tuple(dest["block_ids"])), list(range(len(dest["block_ids"]))))
        transfer.finish(10**9).result(WAIT)  # the KV itself is well-formed: the receiver acknowledges it
    finally:
        sender.close()
    deadline = time.monotonic() + WAIT
    outputs = []
    while not any(o[0] == "nonsense" for o in outputs) and time.monotonic() < deadline:
        outputs += ray.get(live.get_outputs.remote(0.5), timeout=WAIT)["outputs"]
    request_id, tokens, finish, error, *_logprobs = next(o for o in outputs if o[0] == "nonsense")
    assert (tokens, finish) == ([], "abort") and "outside the vocabulary" in error
    assert ray.get(live.stats.remote(), timeout=WAIT)["receive_failures"].get("range") == 1
    assert isinstance(ray.get(prefill_to(prefill, reserve(live, "sane", prompt(51)), "sane", prompt(51)), timeout=WAIT)["first_token"], int)
    assert_all_free(prefill, live)

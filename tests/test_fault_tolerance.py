"""Workers die for real (SIGKILL of their process, found by the pid `pdserve status` shows) while
requests stream, on both KV transfer backends: every request completes with exactly the tokens
of an uninterrupted run, the pool is refilled, and no worker holds a KV block afterwards.
Simultaneous arrivals spread over the decode workers."""

import asyncio
import os
import signal
import statistics
import time
import urllib.request

import grpc
import pytest
from test_cluster import CHATS, RAW, assert_invariants, cluster_state, start_cluster, wait_all_free

from benchmarks.worker_death import Streams
from engine import SamplingParams
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

SEEDED = dict(temperature=0.8, top_p=0.95, seed=1234)


@pytest.fixture(scope="module", params=["nccl", "grpc"])
def cluster(request, ray_local):
    cluster = start_cluster(prefill=1, decode=2, transfer=request.param, metrics_port=0)
    yield cluster
    cluster.stop()


def chat(i: int, text: str, max_tokens: int, **sampling) -> pb.GenerateRequest:
    """Greedy unless `sampling` says otherwise."""
    sampling = {"temperature": 0.0, **sampling}
    request = pb.GenerateRequest(request_id=f"ft-{i}", sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling))
    request.messages.messages.add(role="user", content=text)
    return request


def reference(llm, requests):
    """LLM.generate's tokens for the same requests: what an uninterrupted run gives."""
    prompts = [llm.apply_chat_template([{"role": "user", "content": r.messages.messages[0].content}]) for r in requests]
    params = []
    for r in requests:
        s = r.sampling
        seeded = dict(temperature=s.temperature, top_p=s.top_p, seed=s.seed) if s.HasField("seed") else dict(temperature=0)
        params.append(SamplingParams(max_tokens=s.max_tokens, ignore_eos=True, **seeded))
    return [o.token_ids for o in llm.generate(prompts, params)]


async def until(condition, timeout=300, every=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(every)


def worker_states(target, role):
    return [w for w in cluster_state(target).workers if w.role == role]


def wait_for_pool(target, role, size, timeout=300):
    deadline = time.monotonic() + timeout
    while len([w for w in worker_states(target, role) if w.state == "ready"]) != size:
        assert time.monotonic() < deadline, f"the {role} pool is not back to {size}: {worker_states(target, role)}"
        time.sleep(0.5)


def metric_samples(cluster, name):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_16_simultaneous_requests_spread_over_the_decode_workers(cluster):
    requests = [chat(i, CHATS[i % len(CHATS)] + " " + RAW[i % len(RAW)], max_tokens=4) for i in range(16)]
    streams = Streams(cluster.target, requests)
    asyncio.run(streams.run(lambda _: asyncio.sleep(0)))
    assert not streams.errors, streams.errors
    placed = [next(e.worker for e in last.timeline if e.name == "reserved") for last in streams.last]
    split = sorted((placed.count(w) for w in set(placed)), reverse=True)
    print(f"\n[{cluster.config.transfer}] 16 simultaneous requests over 2 decode workers: {split[0]}/{16 - split[0]}")
    assert len(split) == 2 and split[0] <= 10, split
    wait_all_free(cluster.target)
    assert_invariants(cluster)


def test_sigkill_of_a_decode_worker_while_12_requests_stream(cluster, default_llm):
    """12 greedy requests and 2 seeded ones stream; the decode worker holding the first seeded one
    is killed. Each of its requests resumes on the other worker (prompt + the tokens it had
    streamed), seeded sampling going on as it would have."""
    requests = [chat(i, CHATS[i % len(CHATS)], max_tokens=40 + 4 * i) for i in range(12)]
    requests += [chat(12 + i, RAW[i], max_tokens=40, **SEEDED) for i in range(2)]
    expected = reference(default_llm, requests)
    killed = {}

    async def kill_a_decode_worker(streams):
        await until(lambda: all(streams.tokens))  # every request is decoding
        victim = cluster.router.requests["ft-12"].decode
        killed.update(id=victim.id, requests=len(victim.requests), at=time.monotonic())
        os.kill(victim.pid, signal.SIGKILL)

    streams = Streams(cluster.target, requests)
    asyncio.run(streams.run(kill_a_decode_worker))
    assert not streams.errors, streams.errors
    assert streams.tokens == expected
    assert all(last.finish_reason == "length" and last.usage.completion_tokens == len(tokens)
               for last, tokens in zip(streams.last, streams.tokens))  # fmt: skip
    moved = streams.moved()
    assert len(moved) == killed["requests"] and 12 in moved, (moved, killed)
    detected, resumed = zip(*(streams.recovery(i, killed["at"]) for i in moved))
    steps = ("reserved", "prefill_started", "prefill_ended", "transfer_ended", "first_token")
    after = {step: statistics.median(streams.after_move(i).get(step, float("nan")) for i in moved) for step in steps}
    print(f"\n[{cluster.config.transfer}] SIGKILL of {killed['id']} holding {killed['requests']} requests: {len(moved)} moved; "
          f"kill -> moved: median {statistics.median(detected):.2f}s, max {max(detected):.2f}s; "
          f"kill -> next token: median {statistics.median(resumed):.2f}s, max {max(resumed):.2f}s; "
          f"after the move (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in after.items()))  # fmt: skip
    wait_for_pool(cluster.target, "decode", 2)
    wait_all_free(cluster.target)
    assert_invariants(cluster)
    time.sleep(2.5)  # one refresh of the metrics
    migrations = {s.labels["reason"]: s.value for s in metric_samples(cluster, "pdserve_migrations_total")}
    assert migrations.get("decode_died", 0) >= len(moved)
    recovery = [s for s in metric_samples(cluster, "pdserve_request_phase_seconds_count") if s.labels["phase"] == "recovery"]
    assert recovery and recovery[0].value >= len(moved)


def test_sigkill_of_a_prefill_worker_mid_prefill(cluster, default_llm):
    """With two prefill workers, one is killed while it computes long prompts: they are prefilled
    again on the other one, invisibly to the clients."""
    asyncio.run(_scale(cluster.target, prefill=2, decode=2))
    filler = " ".join(RAW)
    requests = [chat(i, f"{CHATS[i % len(CHATS)]} {filler * (2 + i % 3)}", max_tokens=8) for i in range(12)]
    expected = reference(default_llm, requests)
    killed = {}

    async def kill_a_busy_prefill_worker(streams):
        workers = lambda: [w for w in cluster.router.workers.values() if w.role.value == "prefill"]  # noqa: E731
        await until(lambda: any(len(w.requests) >= 3 for w in workers()))
        victim = max(workers(), key=lambda w: len(w.requests))
        killed.update(id=victim.id, requests=len(victim.requests))
        os.kill(victim.pid, signal.SIGKILL)

    streams = Streams(cluster.target, requests)
    asyncio.run(streams.run(kill_a_busy_prefill_worker))
    assert not streams.errors, streams.errors
    assert streams.tokens == expected
    assert all(last.finish_reason == "length" for last in streams.last)
    retries = {s.labels["reason"]: s.value for s in metric_samples(cluster, "pdserve_retries_total")}
    print(f"\n[{cluster.config.transfer}] SIGKILL of {killed['id']} with {killed['requests']} prompts: "
          f"{len(streams.moved())} retried (those sent to it before its death was known too): {retries}")  # fmt: skip
    assert len(streams.moved()) >= killed["requests"]
    wait_for_pool(cluster.target, "prefill", 2)
    wait_all_free(cluster.target)
    assert_invariants(cluster)


def test_sigstop_of_a_decode_worker_while_requests_stream(ray_local, default_llm):
    """Frozen, not dead: Ray reports nothing, the process holds its blocks and sockets. After
    unresponsive_after of silence the router takes it for dead: its requests move (same tokens as
    an undisturbed run, no error) and supervision kills it and starts a replacement."""
    from router.router import RouterConfig

    cluster = start_cluster(prefill=1, decode=2, router=RouterConfig(unresponsive_after=5.0))
    requests = [chat(i, CHATS[i % len(CHATS)], max_tokens=32 + 4 * i) for i in range(8)]
    expected = reference(default_llm, requests)
    frozen = {}

    async def freeze_a_decode_worker(streams):
        await until(lambda: all(streams.tokens))
        victim = max((w for w in cluster.router.workers.values() if w.role.value == "decode"), key=lambda w: len(w.requests))
        frozen.update(id=victim.id, pid=victim.pid, requests=len(victim.requests), at=time.monotonic())
        os.kill(victim.pid, signal.SIGSTOP)

    try:
        streams = Streams(cluster.target, requests)
        asyncio.run(streams.run(freeze_a_decode_worker))
        assert not streams.errors, streams.errors
        assert streams.tokens == expected
        moved = streams.moved()
        assert len(moved) == frozen["requests"] > 0, (moved, frozen)
        resumed = [streams.recovery(i, frozen["at"])[1] for i in moved]
        print(f"\nSIGSTOP of {frozen['id']} holding {frozen['requests']} requests: kill -> next token "
              f"median {statistics.median(resumed):.1f}s, max {max(resumed):.1f}s (unresponsive_after 5s)")
        wait_for_pool(cluster.target, "decode", 2)
        assert frozen["id"] not in {w.id for w in worker_states(cluster.target, "decode")}
        deadline = time.monotonic() + 60
        while _exists(frozen["pid"]):  # supervision's ray.kill ends a stopped process too
            assert time.monotonic() < deadline, f"the frozen worker's process {frozen['pid']} is still there"
            time.sleep(0.5)
        wait_all_free(cluster.target)
        assert_invariants(cluster)
    finally:
        if frozen and _exists(frozen["pid"]):
            os.kill(frozen["pid"], signal.SIGKILL)  # this test stopped it: never leave it behind
        cluster.stop()


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has ended; its parent has yet to reap it
    except FileNotFoundError:
        return False


async def _scale(target, **sizes):
    async with grpc.aio.insecure_channel(target) as channel:
        await pb_grpc.AdminStub(channel).Scale(pb.ScaleRequest(**sizes), timeout=600)


def test_bench_worker_death(ray_local, tmp_path, published_table):
    """`pdserve bench worker-death` at a small scale (grpc, 4 requests; its default runs both
    backends with 14): the killed worker's requests move and end with the undisturbed run's tokens,
    nothing fails or leaks, the pool is refilled, and its published table renders from the JSON."""
    from benchmarks import worker_death

    r = worker_death.main(["--transfer", "grpc", "--requests", "4", "--json", str(tmp_path / "wd.json")])
    (run,) = r["runs"]
    assert run["transfer"] == "grpc" and run["process_group"] is None and run["requests"] == 4
    assert 1 <= run["moved"] == run["killed"]["holding"], run
    assert run["identical"] == 4 and run["failed"] == 0 and run["blocks_leaked"] == 0 and run["pools_at_end"]["decode"] == 2, run
    assert run["identical_moved"] == run["moved"] and run["seeded_moved_identical"] == run["seeded_moved"] <= 2, run
    assert 0 < run["kill_to_moved_s"]["median"] <= run["kill_to_next_token_s"]["median"]
    assert run["after_move_s"]["reserved"] <= run["after_move_s"]["first_token"]
    table = published_table("worker-death", {"worker_death.json": tmp_path / "wd.json"})
    assert f"{run['moved']} of {run['killed']['holding']}" in table and f"**{run['moved']}/{run['moved']}** (4/4)" in table

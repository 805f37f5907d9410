"""Mock workers in a real cluster: the real router over gRPC, Ray actors and KV transfers that
carry the profiled layout's bytes; the same tokens as a mock LLM in this process; and 32 mock
workers starting and serving on this machine (their memory is printed)."""

import asyncio
import os
import socket
import time
from pathlib import Path

import grpc
import pytest
import ray

from cluster import cli
from cluster.cluster import Cluster
from cluster.config import ServeConfig
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.cost_model import CostProfile, Grid, KVSpec, Link
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

PROFILE = CostProfile(
    name="fast", source="derived", model="test-model", hardware="none", kv=KVSpec(8, 2, 32, "bfloat16"),
    prefill=Grid((16, 512), (0, 1024), ((0.020, 0.030), (0.100, 0.140))),
    decode=Grid((1, 64), (16, 1024), ((0.020, 0.025), (0.030, 0.040))),
    step_overhead_seconds=0.003, startup_seconds=0.0, transfer={"grpc": Link(0.001, 1e9), "nccl": Link(0.001, 1e9)},
)  # fmt: skip
TEXTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, " * 20, "1, 1, 2, 3, 5, 8,",
         "Paris is the capital of France. Berlin is the capital of", "import numpy as np", "Roses are red", "Hi"]  # fmt: skip


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("profiles") / "fast.json"
    PROFILE.save(path)
    return str(path)


def engine_config(profile_file, **options) -> EngineConfig:
    return EngineConfig(**{"engine": f"mock:{profile_file}", "kv_cache_gb": 0.02, "max_model_len": 1024, **options})


def request(i: int, text: str) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=6 + i, temperature=0.7)  # sampling options mean nothing to a mock
    if i % 3 == 0:
        sampling.mock_output_len = 3 + i // 3
    return pb.GenerateRequest(request_id=f"m{i}", prompt=text, sampling=sampling)


def stream_all(target: str, requests: list) -> list:
    async def one(stub, r):
        tokens, text, last = [], "", None
        async for response in stub.Generate(r, timeout=120):
            tokens += response.token_ids
            text += response.text
            last = response
        return tokens, text, last.finish_reason

    async def body():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await asyncio.gather(*(one(stub, r) for r in requests))

    return asyncio.run(body())


def worker_stats(cluster: Cluster) -> list[dict]:
    return ray.get([w.handle.stats.remote() for w in cluster.router.workers.values()], timeout=60)


def wait_all_free(cluster: Cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = [s["kv_blocks"]["in_use"] + s["running"] + s["waiting"] for s in worker_stats(cluster)]
        if not any(held):
            break
        time.sleep(0.2)
    assert not any(held), f"blocks or requests still held: {held}"
    handles = [w.handle for w in cluster.router.workers.values()]
    assert ray.get([h.check_invariants.remote() for h in handles], timeout=60) == [0] * len(handles)


@pytest.mark.parametrize("transfer", ["grpc", "nccl"])
def test_mock_cluster_serves_the_same_tokens_as_a_mock_llm(ray_local, profile_file, transfer):
    cluster = Cluster(ServeConfig(engine=engine_config(profile_file), prefill=1, decode=2, transfer=transfer, port=0)).start()
    try:
        requests = [request(i, text) for i, text in enumerate(TEXTS)]
        results = stream_all(cluster.target, requests)
        llm = LLM(engine=f"mock:{profile_file}", kv_cache_gb=0.02)
        params = [SamplingParams(max_tokens=r.sampling.max_tokens, mock_output_len=r.sampling.mock_output_len or None)
                  for r in requests]  # fmt: skip
        prompts = [llm.tokenizer.encode(t) for t in TEXTS]
        for (tokens, text, reason), ref in zip(results, llm.generate(prompts, params)):
            assert (tokens, text, reason) == (ref.token_ids, ref.text, ref.finish_reason)
        assert {reason for _, _, reason in results} == {"stop", "length"}  # the hints ended some early
        wait_all_free(cluster)
        # Every prompt's KV crossed over: its blocks, in the profiled layout (8 layers x 2 x 16 x 2 x 32 bf16).
        sent = sum(s["transfer"]["bytes"] for s in worker_stats(cluster) if s["role"] == "prefill")
        assert sent == sum(-(-len(p) // 16) for p in prompts) * 8 * 2 * 16 * 2 * 32 * 2
    finally:
        cluster.stop()


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes: PSS splits shared pages (torch's libraries) between the processes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return int(fields["Rss"].split()[0]) * 1024, int(fields["Pss"].split()[0]) * 1024


async def occupy_every_worker(target: str) -> None:
    """A burst of 32 prompts (each goes to the prefill worker with the fewest queued tokens), then
    16 long streams started one at a time, each once the previous one streams (each goes to the
    decode worker with the most free KV blocks, as the router last heard), then cancelled."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def last(call):
            return [response async for response in call][-1]

        burst = await asyncio.gather(*(last(stub.Generate(request(i, f"{TEXTS[i % 8]} #{i}"), timeout=120)) for i in range(32)))
        assert all(response.finish_reason in ("stop", "length") for response in burst)
        streams = []
        for i in range(16):
            call = stub.Generate(pb.GenerateRequest(prompt=f"Stream {i}", sampling=pb.SamplingParams(max_tokens=4000)), timeout=300)
            await call.__aiter__().__anext__()
            streams.append(call)
        for call in streams:
            call.cancel()


def test_32_mock_workers_start_and_serve(ray_local, profile_file):
    engine = engine_config(profile_file, kv_cache_gb=0.01, max_model_len=4096)  # 327 blocks of 16 tokens (32 KiB each)
    start = time.perf_counter()
    cluster = Cluster(ServeConfig(engine=engine, prefill=16, decode=16, port=0)).start()
    started = time.perf_counter() - start
    try:
        assert len(cluster.router.workers) == 32
        asyncio.run(occupy_every_worker(cluster.target))
        wait_all_free(cluster)
        steps = {s["id"]: s["steps"] for s in worker_stats(cluster)}
        assert all(steps.values()), f"workers that never stepped: {[w for w, n in steps.items() if not n]}"
        pids = ray.get([w.handle.__ray_call__.remote(lambda worker: os.getpid()) for w in cluster.router.workers.values()])
        rss, pss = map(sum, zip(*(memory(pid) for pid in pids)))
        print(f"\n32 mock workers ready in {started:.0f} s: RSS {rss / 2**30:.2f} GiB in all ({rss / 32 / 2**20:.0f} MiB each), "
              f"PSS {pss / 2**30:.2f} GiB ({pss / 32 / 2**20:.0f} MiB each)")  # fmt: skip
        assert pss < 12 * 2**30  # half of this 24 GiB machine
    finally:
        cluster.stop()


def test_a_scale_call_that_goes_away_still_resizes_the_pool(ray_local, profile_file):
    """The client's deadline passes (or it is cancelled) while the new worker starts: the call
    ends, the resize does not. Before, the worker was killed with the call and the pool stayed
    short of its new target, with nothing to refill it."""
    cluster = Cluster(ServeConfig(engine=engine_config(profile_file), prefill=1, decode=1, port=0)).start()
    try:
        async def scale():
            async with grpc.aio.insecure_channel(cluster.target) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await pb_grpc.AdminStub(channel).Scale(pb.ScaleRequest(decode=2), timeout=0.3)  # a start takes seconds
                return e.value.code()

        assert asyncio.run(scale()) == grpc.StatusCode.DEADLINE_EXCEEDED
        decode = lambda: [w for w in cli.fetch_state(cluster.target)["workers"] if w["role"] == "decode"]  # noqa: E731
        deadline = time.monotonic() + 120
        while [w["state"] for w in decode()] != ["ready", "ready"]:
            assert time.monotonic() < deadline, decode()
            time.sleep(0.2)
    finally:
        cluster.stop()


class _Started(Exception):
    """`pdserve serve` got as far as starting its cluster."""


@pytest.fixture
def built(monkeypatch) -> list:
    """The ServeConfigs `pdserve serve` builds a Cluster from; starting one raises _Started."""
    configs = []

    class FakeCluster:
        def __init__(self, config):
            configs.append(config)

        def start(self):
            raise _Started

        def stop(self):
            """Nothing was started."""

    monkeypatch.setattr("cluster.cluster.Cluster", FakeCluster)
    return configs


def test_serve_engine_flags_reach_every_worker(built):
    with pytest.raises(_Started):
        cli.main(["serve", "--engine", "mock:llama-3.1-8b-h100", "--mock-kv-fraction", "0.125"])
    engine = built[0].engine
    assert (engine.engine, engine.mock_kv_fraction, engine.mock_profile) == ("mock:llama-3.1-8b-h100", 0.125, "llama-3.1-8b-h100")


def test_serve_flags_are_checked_before_anything_starts_and_keys_given_replace_the_environments(built, monkeypatch):
    """A bad flag or a taken port is one line on stderr before Ray or a model starts; a planner
    flag without --autoscale is refused, not ignored; --api-key replaces $PDSERVE_API_KEY
    (rotating a leaked key must drop it)."""
    taken = socket.create_server(("127.0.0.1", 0))
    for argv, message in ((["--prefill", "0"], "at least one prefill and one decode worker"),
                          (["--colocated", "2", "--decode", "3"], "--colocated N replaces the two pools"),
                          (["--http-port", str(taken.getsockname()[1])], f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"),
                          (["--slo-ttft-ms", "200"], "--slo-ttft-ms needs --autoscale"),
                          (["--nodes-on-demand"], "--nodes-on-demand needs --address"),
                          (["--autoscale", "slo", "--min-decode", "3"], "outside the planner's bounds"),
                          (["--colocated", "2", "--max-decode", "4"], "--max-decode bounds a pool a colocated cluster does not have"),
                          (["--autoscale", "slo", "--min-colocated", "2"], "--min-colocated bounds a pool a disaggregated")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            cli.main(["serve", "--engine", "mock:llama-3.1-8b-h100", *argv])
    taken.close()
    assert not built  # nothing was built
    monkeypatch.setenv("PDSERVE_API_KEY", "old-key-0123456789")
    for argv, keys in ((["--api-key", "new-key-0123456789"], ("new-key-0123456789",)), ([], ("old-key-0123456789",))):
        with pytest.raises(_Started):
            cli.main(["serve", "--engine", "mock:llama-3.1-8b-h100", "--port", "0", *argv])
        assert built.pop().api_keys == keys

"""The whole cluster on a local Ray, through the real gRPC API, with the default model: the same
tokens as LLM.generate on every path, cancellation that frees every block, bad input refused,
pools resized under load without losing a request."""

import asyncio
import dataclasses
import json
import random
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from gpus import placement
from oracle import ORACLE_DTYPE

from cluster.cluster import Cluster
from cluster.config import ServeConfig
from engine import SamplingParams
from engine.config import EngineConfig
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

# 364 blocks of 16 tokens per worker; the dtype of default_llm, which the clusters must match token for token
ENGINE = EngineConfig(kv_cache_gb=0.25, max_model_len=2048, dtype=ORACLE_DTYPE)

CHATS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain photosynthesis in one sentence.", "What is 12 times 12?", "Name a famous painter.",
    "Say hello in Spanish.", "Give me a tip for learning to code.",
]  # fmt: skip
RAW = [
    "The quick brown fox", "def fibonacci(n):\n    ", "1, 1, 2, 3, 5, 8,", "Once upon a time, " * 12,
    "Paris is the capital of France. Berlin is the capital of", "The meaning of life is",
    "import numpy as np\n", "Roses are red, violets are",
]  # fmt: skip


def start_cluster(engine=ENGINE, transfer="auto", **pools) -> Cluster:
    workers = pools.get("colocated") or pools.get("prefill", 1) + pools.get("decode", 1)
    return Cluster(ServeConfig(engine=engine, port=0, **placement(workers, transfer), **pools)).start()


# The three clusters also differ in scheduling, so "same tokens as LLM.generate" covers each
# feature on and off: defaults (prefix caching, 512-token chunks); small chunks that split most
# prompts across steps; neither chunking nor prefix caching.
@pytest.fixture(scope="module")
def grpc_cluster(ray_local):
    cluster = start_cluster(prefill=1, decode=2, transfer="grpc", metrics_port=0)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def nccl_cluster(ray_local):
    engine = dataclasses.replace(ENGINE, chunk_size=32, max_num_batched_tokens=256)
    cluster = start_cluster(engine, prefill=1, decode=2, transfer="nccl")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def colocated_cluster(ray_local):
    engine = dataclasses.replace(ENGINE, enable_chunked_prefill=False, enable_prefix_caching=False)
    cluster = start_cluster(engine, colocated=2)
    yield cluster
    cluster.stop()


PENALTIES = dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3)


def requests_16():
    """16 greedy requests: 8 chats, 8 raw prompts, all different lengths and max_tokens; every
    fourth with penalties (the prefill worker applies them to the first token, the decode worker
    to the rest)."""
    out = []
    for i, text in enumerate(CHATS + RAW):
        sampling = pb.SamplingParams(temperature=0, max_tokens=8 + 2 * i, **(PENALTIES if i % 4 == 3 else {}))
        req = pb.GenerateRequest(request_id=f"eq-{i}", sampling=sampling)
        if i < len(CHATS):
            req.messages.messages.add(role="user", content=text)
        else:
            req.prompt = text
        out.append(req)
    return out


def engine_reference(llm, requests):
    """What LLM.generate gives for the same greedy requests."""
    prompts = [llm.apply_chat_template([{"role": "user", "content": r.messages.messages[0].content}])
               if r.WhichOneof("input") == "messages" else llm.tokenizer.encode(r.prompt) for r in requests]  # fmt: skip
    params = [SamplingParams(temperature=0, max_tokens=r.sampling.max_tokens, ignore_eos=r.sampling.ignore_eos,
                             **{name: getattr(r.sampling, name) for name in PENALTIES if r.sampling.HasField(name)})
              for r in requests]  # fmt: skip
    return llm.generate(prompts, params)


async def stream(stub, request, timeout=300):
    tokens, text, last = [], "", None
    async for response in stub.Generate(request, timeout=timeout):
        tokens += response.token_ids
        text += response.text
        last = response
    return tokens, text, last


def stream_all(target, requests):
    async def body():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await asyncio.gather(*(stream(stub, r) for r in requests))

    return asyncio.run(body())


def kv_in_use(target) -> list[int]:
    with grpc.insecure_channel(target) as channel:
        state = pb_grpc.GenerationStub(channel).GetClusterState(pb.GetClusterStateRequest(), timeout=30)
    return [w.kv_blocks.in_use + w.running + w.waiting for w in state.workers]


def wait_all_free(target, timeout=60):
    deadline = time.monotonic() + timeout
    while any(kv_in_use(target)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(kv_in_use(target)), f"blocks/requests still held after {timeout}s: {kv_in_use(target)}"


def assert_invariants(cluster):
    """Every worker's KV bookkeeping is consistent now, and has been at every idle moment."""
    import ray

    handles = [w.handle for w in cluster.router.workers.values()]
    assert ray.get([h.check_invariants.remote() for h in handles], timeout=60) == [0] * len(handles)


def assert_same_as_engine(results, reference):
    for (tokens, text, last), ref in zip(results, reference):
        assert tokens == ref.token_ids
        assert text == ref.text
        assert last.finish_reason == ref.finish_reason
        assert last.usage.completion_tokens == len(ref.token_ids) and last.usage.prompt_tokens == len(ref.prompt_token_ids)


@pytest.mark.parametrize("which", ["grpc_cluster", "nccl_cluster", "colocated_cluster"])
def test_16_concurrent_streams_match_llm_generate(which, request, default_llm):
    cluster = request.getfixturevalue(which)
    requests = requests_16()
    results = stream_all(cluster.target, requests)
    assert_same_as_engine(results, engine_reference(default_llm, requests))
    wait_all_free(cluster.target)
    if which == "nccl_cluster":  # 32-token chunks: the longer prompts took several steps
        assert sum(w.chunked_prefill_steps for w in cluster_state(cluster.target).workers if w.role == "prefill") > 0


@pytest.mark.parametrize("which", ["nccl_cluster", "colocated_cluster"])
def test_prompt_logprobs_through_the_cluster_equal_llm_generate(which, request, default_llm):
    """A 100-token prompt's logprobs: computed by the prefill worker in 32-token chunks (or by a
    colocated worker whole), on the first response, equal to the engine's own; then the same
    prompt again (now in the prefix cache: computed again all the same)."""
    cluster = request.getfixturevalue(which)
    prompt = default_llm.tokenizer.encode("The history of the city of Rome spans two and a half thousand years. " * 8)[:100]
    (ref,) = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=3))
    sampling = pb.SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=3)
    with grpc.insecure_channel(cluster.target) as channel:
        for _ in range(2):
            responses = list(pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling),
                                                                      timeout=120))  # fmt: skip
            assert [t for r in responses for t in r.token_ids] == ref.token_ids and all(not r.prompt_logprobs for r in responses[1:])
            got = responses[0].prompt_logprobs
            assert len(got) == len(prompt) - 1
            for lp, want in zip(got, ref.prompt_logprobs[1:]):
                assert lp.logprob == pytest.approx(want.logprob, abs=1e-4) and [t.token_id for t in lp.top] == [t for t, _ in want.top]
                assert lp.rank == want.rank
    wait_all_free(cluster.target)


def cluster_state(target):
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.GenerationStub(channel).GetClusterState(pb.GetClusterStateRequest(), timeout=30)


def test_second_request_sharing_a_1024_token_prefix_prefills_only_its_suffix(grpc_cluster, default_llm):
    prefix = (default_llm.tokenizer.encode("The history of the city of Rome spans two and a half thousand years. " * 80))[:1024]
    first, second = prefix + [504, 2988, 314], prefix + [1780, 314, 260, 3575]
    prefill = lambda: next(w for w in cluster_state(grpc_cluster.target).workers if w.role == "prefill")  # noqa: E731
    request = lambda ids: pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(temperature=0, max_tokens=8))  # noqa: E731
    stream_all(grpc_cluster.target, [request(first)])
    before = prefill().prefix_cache
    ((tokens, _, _),) = stream_all(grpc_cluster.target, [request(second)])
    after = prefill().prefix_cache
    assert after.query_tokens - before.query_tokens == len(second)
    assert after.hit_tokens - before.hit_tokens == 1024  # computed: only the 4-token suffix
    assert tokens == default_llm.generate(second, SamplingParams(temperature=0, max_tokens=8))[0].token_ids


def test_cancel_half_of_20_inflight_requests(grpc_cluster, default_llm):
    """10 of 20 requests cancelled mid-stream at random points, 5 by the client and 5 by Abort: the
    other 10 complete correctly, each Abort ends its stream there, and no worker holds a block after.
    The cancelled ones ask for 256 tokens and are cancelled within their first 16, so an Abort
    that did not take effect shows as a stream that ran to its length, not as a slow one."""
    rng = random.Random(20)
    order = list(range(20))
    rng.shuffle(order)
    by_client, by_abort = set(order[:5]), set(order[5:10])
    cancel_after = {i: rng.randint(1, 16) for i in order[:10]}  # tokens received before cancelling
    requests = []
    for i in range(20):
        prompt = RAW[i % len(RAW)] + " " + CHATS[i % len(CHATS)] * (1 + i % 4)  # 30 to 200 tokens
        max_tokens = 256 if i in cancel_after else 64
        requests.append(pb.GenerateRequest(request_id=f"cx-{i}", prompt=prompt,
                                           sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)))  # fmt: skip

    async def one(stub, i):
        call = stub.Generate(requests[i], timeout=300)
        tokens = []
        async for r in call:
            tokens += r.token_ids
            if i in cancel_after and len(tokens) >= cancel_after[i]:
                break
        if i not in cancel_after:
            return "completed", tokens
        received = len(tokens)
        if i in by_client:
            call.cancel()
            return "cancelled", received
        found = (await stub.Abort(pb.AbortRequest(request_id=requests[i].request_id))).found
        last = None
        async for r in call:
            received += len(r.token_ids)
            last = r.finish_reason
        return (last if found else "not found"), received

    async def body():
        async with grpc.aio.insecure_channel(grpc_cluster.target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(20)))

    outcomes = asyncio.run(body())
    kept = [i for i in range(20) if i not in cancel_after]
    reference = engine_reference(default_llm, [requests[i] for i in kept])
    for i, ref in zip(kept, reference):
        assert outcomes[i] == ("completed", ref.token_ids)
    for i in by_client:
        assert outcomes[i][0] == "cancelled"
    for i in by_abort:
        finish, received = outcomes[i]
        assert finish == "abort" and cancel_after[i] <= received < 256, (i, outcomes[i])
    wait_all_free(grpc_cluster.target)
    assert_invariants(grpc_cluster)


BAD = [
    (pb.GenerateRequest(), "no input"),
    (pb.GenerateRequest(prompt=""), "prompt is empty"),
    (pb.GenerateRequest(messages=pb.ChatMessages()), "messages is empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids is empty"),
    (pb.GenerateRequest(prompt="word " * 2100), "maximum context length is 2048 tokens"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 49152])), "outside the vocabulary"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), "outside the vocabulary"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=0)), "max_tokens must be >= 1"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=5000)), "max_tokens can be at most"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-1)), "temperature must be >= 0"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=0)), r"top_p must be in (0, 1]"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)), r"top_p must be in (0, 1]"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_k=-3)), "top_k must be"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=[""])), "stop strings must be non-empty"),
]


def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(grpc_cluster):
    with grpc.insecure_channel(grpc_cluster.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for request, message in BAD:
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(request, timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, e.value.details())
            assert message in e.value.details()
        good = list(stub.Generate(pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(max_tokens=3)), timeout=60))
        assert good[-1].finish_reason in ("stop", "length")


def test_deadline_exceeded_frees_the_blocks(grpc_cluster):
    with grpc.insecure_channel(grpc_cluster.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        long = pb.GenerateRequest(prompt="Tell me a story.", sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(long, timeout=1.5))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_all_free(grpc_cluster.target)


def test_model_info_health_reflection_and_status(grpc_cluster):
    target = grpc_cluster.target
    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"))
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert (info.model_name, info.max_model_len, info.vocab_size, info.block_size) == ("SmolLM2-135M-Instruct", 2048, 49152, 16)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert {"pdserve.v1.Generation", "pdserve.v1.Admin", "grpc.health.v1.Health"} <= services
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--json", "--target", target],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert sorted(w["role"] for w in status["workers"]) == ["decode", "decode", "prefill"]
    for w in status["workers"]:
        assert set(w) >= {"id", "role", "state", "running", "waiting", "kv_blocks"} and w["state"] == "ready"
        assert set(w["kv_blocks"]) == {"total", "free", "cached", "in_use"} and w["kv_blocks"]["total"] == 364
        kv = w["kv_blocks"]
        assert kv["free"] + kv["cached"] + kv["in_use"] == kv["total"]


def test_cli_generate_streams_a_reply(grpc_cluster):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "What is 2+2?", "--max-tokens", "12",
                          "--target", grpc_cluster.target], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "completion tokens]" in out.stderr


def test_scale_up_and_down_under_a_steady_stream_loses_nothing(nccl_cluster, default_llm):
    prompts = [f"Count from {n} to {n + 5}:" for n in range(6)]
    reference = {p: o.token_ids for p, o in zip(prompts, default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12)))}

    async def body():
        async with grpc.aio.insecure_channel(nccl_cluster.target) as channel:
            stub, admin = pb_grpc.GenerationStub(channel), pb_grpc.AdminStub(channel)
            await admin.Scale(pb.ScaleRequest(prefill=1, decode=1), timeout=600)
            stop, tasks = asyncio.Event(), []

            async def steady():
                i = 0
                while not stop.is_set():
                    request = pb.GenerateRequest(prompt=prompts[i % len(prompts)], sampling=pb.SamplingParams(temperature=0, max_tokens=12))
                    tasks.append(asyncio.create_task(stream(stub, request)))
                    i += 1
                    await asyncio.sleep(0.25)

            producer = asyncio.create_task(steady())
            await asyncio.sleep(1.5)
            up = await admin.Scale(pb.ScaleRequest(prefill=2, decode=2), timeout=600)
            await asyncio.sleep(2.0)
            down = await admin.Scale(pb.ScaleRequest(prefill=1, decode=1), timeout=600)
            await asyncio.sleep(1.0)
            stop.set()
            await producer
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return up, down, results, [prompts[i % len(prompts)] for i in range(len(tasks))]

    up, down, results, sent = asyncio.run(body())
    assert sorted(w.role for w in up.workers if w.state == "ready") == ["decode", "decode", "prefill", "prefill"]
    assert sorted(w.role for w in down.workers) == ["decode", "prefill"]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert len(results) >= 15
    for (tokens, _, last), prompt in zip(results, sent):
        assert tokens == reference[prompt] and last.finish_reason == "length"
    wait_all_free(nccl_cluster.target)
    assert_invariants(nccl_cluster)


def test_prometheus_metrics_are_populated(grpc_cluster):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    stream_all(grpc_cluster.target, requests_16()[:4])
    time.sleep(2.5)  # one refresh of the workers' stats
    with urllib.request.urlopen(f"http://127.0.0.1:{grpc_cluster.metrics_port}/metrics", timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}

    def samples(name, suffix=""):
        return [s for s in families[name].samples if s.name == name + suffix]

    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:inter_token_latency_seconds"):
        counts = samples(name, "_count")
        assert counts and all(s.labels["role"] == "decode" for s in counts)
        assert sum(s.value for s in counts) >= 4
    transfers = samples("pdserve_kv_transfer_seconds", "_count")
    assert [s.labels["role"] for s in transfers] == ["prefill"] and transfers[0].value >= 4
    assert samples("pdserve_kv_transfer_bytes", "_total")[0].value > 0
    workers = {s.labels["worker"] for s in samples("vllm:num_requests_running")}
    assert len(workers) == 3 and len(samples("vllm:kv_cache_usage_perc")) == 3
    assert sum(s.value for s in samples("vllm:prefix_cache_queries", "_total")) > 0
    assert {(s.labels["role"], s.value) for s in samples("pdserve_workers")} == {("prefill", 1), ("decode", 2)}
    labels = {k for f in families.values() for s in f.samples for k in s.labels}
    assert not any("request" in k for k in labels), labels


def test_bench_serve_against_the_cluster(grpc_cluster, tmp_path):
    from benchmarks import serve

    result_file = tmp_path / "serve.json"
    metrics = serve.main(["--target", grpc_cluster.target, "--dataset", "random", "--num-prompts", "8", "--random-input-len", "32",
                          "--random-output-len", "12", "--request-rate", "20", "--burstiness", "0.5", "--max-concurrency", "6",
                          "--ignore-eos", "--goodput", "ttft:60000", "tpot:60000", "--cancel-rate", "0.25",
                          "--save-result", "--result-filename", str(result_file), "--save-detailed",
                          "--chrome-trace", str(tmp_path / "trace.json")])  # fmt: skip
    saved = json.loads(result_file.read_text())
    for field in ("completed", "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                  "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "request_goodput",
                  "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls"):  # fmt: skip
        assert field in saved, field
    assert saved["completed"] + saved["cancelled"] == 8 and saved["failed"] == 0 and saved["cancelled"] >= 1
    assert saved["request_goodput"] == saved["request_throughput"] and metrics["completed"] == saved["completed"]
    done = [n for n, c in zip(saved["output_lens"], saved["cancelled_requests"]) if not c]
    assert done == [12] * saved["completed"]
    for timeline, cancelled in zip(saved["timelines"], saved["cancelled_requests"]):
        names = [e["name"] for e in timeline]
        assert cancelled or names[:3] == ["arrived", "reserved", "prefill_queued"] and names[-1] == "finished", names
        # The prefill worker's own events come with its answer, which may reach the router after a
        # short reply has finished (the timeline goes out with the last response): not asserted per request.
        assert cancelled or "first_token" in names
    worker_side = {"prefill_started", "prefill_ended", "transfer_started", "transfer_ended"}
    assert any(worker_side <= {e["name"] for e in timeline} for timeline in saved["timelines"])
    phases = {(e["tid"], e["name"]) for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"}
    completed = {tid for tid, name in phases if name == "decode"}
    assert len(completed) == saved["completed"] and any((tid, "prefill") in phases for tid in completed)
    # At its defaults (ShareGPT, all at once) through the CLI, made small only by the request count and output length.
    from cluster import cli

    assert cli.main(["bench", "serve", "--target", grpc_cluster.target, "--num-prompts", "3", "--sharegpt-output-len", "6",
                     "--save-result", "--result-filename", str(tmp_path / "defaults.json")]) == 0  # fmt: skip
    sharegpt = json.loads((tmp_path / "defaults.json").read_text())
    assert sharegpt["completed"] == 3 and sharegpt["total_output_tokens"] <= 18 and sharegpt["dataset"] == "sharegpt"
    assert sharegpt["provenance"]["commit"] and sharegpt["provenance"]["machine"]["cores"] > 0
    wait_all_free(grpc_cluster.target)


def test_the_requests_of_the_only_decode_worker_resume_on_its_replacement(nccl_cluster, default_llm):
    """One decode worker, killed while three requests decode: they wait for the replacement
    supervision starts, and finish there with exactly their tokens."""
    import ray

    from router.workers import Role

    target = nccl_cluster.target

    async def one_decode_worker():  # the fixture starts two (an earlier test may have left one)
        async with grpc.aio.insecure_channel(target) as channel:
            await pb_grpc.AdminStub(channel).Scale(pb.ScaleRequest(decode=1), timeout=600)

    asyncio.run(one_decode_worker())
    dead = next(w for w in nccl_cluster.router.workers.values() if w.role is Role.DECODE)
    prompts = ["Tell me a long story.", "Write a poem about rain.", "Describe a city at night."]
    sampling = dict(max_tokens=40, temperature=0, ignore_eos=True)
    requests = [pb.GenerateRequest(prompt=p, sampling=pb.SamplingParams(**sampling)) for p in prompts]
    reference = [o.token_ids for o in default_llm.generate(prompts, SamplingParams(**sampling))]

    async def body():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            calls = [stub.Generate(r, timeout=300) for r in requests]
            tokens = [list((await call.read()).token_ids) for call in calls]  # all three are decoding
            ray.kill(dead.handle)
            for call, got in zip(calls, tokens):
                while (response := await call.read()) != grpc.aio.EOF:
                    got += response.token_ids
            return tokens

    assert asyncio.run(body()) == reference
    decode = [w for w in cluster_state(target).workers if w.role == "decode"]
    assert [w.state for w in decode] == ["ready"] and decode[0].id != dead.id, decode
    ((tokens, _, last),) = stream_all(target, [pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(max_tokens=4))])
    assert last.finish_reason in ("stop", "length") and tokens
    wait_all_free(target)
    assert_invariants(nccl_cluster)

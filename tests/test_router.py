"""The router's request lifecycle and status codes, through the real gRPC server, with fake
workers standing in for the Ray actors (their `.remote()` returns an awaitable, as Ray's does)."""

import asyncio
import itertools
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.exceptions import RayActorError

from engine.outputs import TokenLogprobs
from engine.tokenizer import Tokenizer
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc
from router.router import Router, RouterConfig
from router.server import ModelInfo, Server
from router.workers import Role, WorkerRecord, WorkerState

MODEL = ModelInfo("fake", max_model_len=256, vocab_size=49152, block_size=16)
HEALTHY = {"alive": True, "step_seconds": 0.0}  # a worker's ping: EngineLoop.health


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class FakeDecode:
    """Reserves (or refuses), then emits `script[request_id]` one token per poll once prefilled
    (from `output_offset` on: a moved request resumes). `answer_delay`: how long reserve() and
    submit() take to answer (submit() starts at once). `capacity`: how many requests it holds;
    past it, reserve() refuses. `die_after_steps`: once that many polls have answered tokens, every
    call raises, as a dead actor's (counted in steps, not polls: the router's empty long polls before
    a request arrives must not kill it early on a slow machine). `freeze`: from then on, calls are
    never answered, as a SIGSTOPped actor's, instead of raising."""

    def __init__(self, refuse=False, die_after_steps=None, answer_delay=0.0, address="fake:1", capacity=None, freeze=False):
        self.refuse, self.die_after_steps, self.answer_delay, self.freeze = refuse, die_after_steps, answer_delay, freeze
        self.address, self.capacity = address, capacity
        self.outbox, self.aborted, self.steps, self.reserved = [], [], 0, []
        self.holding: set[str] = set()
        self.script: dict[str, list[int]] = {}
        self.wake = asyncio.Event()
        self.serial = itertools.count()
        for name in ("reserve", "get_outputs", "abort", "stats", "submit", "ping"):
            setattr(self, name, _Method(getattr(self, f"_{name}")))

    @property
    def dead(self):
        return self.die_after_steps is not None and self.steps >= self.die_after_steps

    def load(self):
        return {"free_blocks": 100, "running": len(self.holding), "serial": next(self.serial), **self.health()}

    def health(self):
        return HEALTHY

    async def _reserve(self, request_id, prompt, params, output_offset=0):
        await asyncio.sleep(self.answer_delay)
        if self.dead:
            await gone(self.freeze)
        self.reserved.append((client_id(request_id), list(prompt), output_offset))
        refuse = self.refuse or (self.capacity is not None and len(self.holding) >= self.capacity)
        if not refuse:
            self.holding.add(request_id)
        return {"address": self.address, "block_ids": None if refuse else [0], "load": self.load()}

    def start(self, key, output_offset=0):
        tokens = self.script.get(client_id(key), [1000, 1001])[output_offset:]
        for i, t in enumerate(tokens):
            self.outbox.append((key, [t], "length" if i == len(tokens) - 1 else None, None, None, None))
        self.wake.set()

    async def _get_outputs(self, timeout):
        if self.dead:
            await gone(self.freeze)
        if not self.outbox:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        out = self.outbox[:1]  # one step's worth per poll, a step taking 10 ms
        del self.outbox[:1]
        if out:
            self.steps += 1
            await asyncio.sleep(0.01)
            if out[0][2] is not None:
                self.holding.discard(out[0][0])
        return {"outputs": out, "load": self.load()}

    async def _abort(self, key):
        if self.dead:
            await gone(self.freeze)
        self.aborted.append(client_id(key))
        live = key in self.holding or any(o[0] == key for o in self.outbox)
        self.outbox = [o for o in self.outbox if o[0] != key]
        self.holding.discard(key)
        if live:  # as the engine: the aborted sequence's last output says so
            self.outbox.append((key, [], "abort", None, None, None))
            self.wake.set()
        return True

    async def _stats(self):
        return {"running": 0, "waiting": 0, "kv_blocks": {"total": 10, "free": 10, "cached": 0, "in_use": 0}}

    async def _ping(self):
        if self.dead:
            await gone(self.freeze)
        return self.health()

    async def _submit(self, request_id, prompt, params, output_offset=0):
        if self.dead:
            await gone(self.freeze)
        self.reserved.append((client_id(request_id), list(prompt), output_offset))
        self.start(request_id, output_offset)
        await asyncio.sleep(self.answer_delay)
        return {"load": self.load()}


async def gone(frozen: bool):
    if frozen:
        await asyncio.sleep(3600)  # cancelled when the test's loop ends
    raise RayActorError()


class FakePrefill:
    """Starts the request on the decode worker whose reservation it was sent, then answers
    (after `answer_delay`), with prompt logprobs when asked: token t's logprob is -t / 1000."""

    def __init__(self, *decodes: FakeDecode, fail=False, answer_delay=0.0, freeze=False):
        self.decodes, self.fail, self.aborted, self.calls = {d.address: d for d in decodes}, fail, [], []
        self.dead, self.answer_delay, self.freeze = False, answer_delay, freeze
        self.prefill, self.abort, self.stats, self.ping = _Method(self._prefill), _Method(self._abort), _Method(self._stats), _Method(self._ping)

    async def _prefill(self, request_id, prompt, params, destination, output_offset=0):
        self.calls.append(client_id(request_id))
        if self.dead:
            await gone(self.freeze)
        if self.fail:
            raise self.fail if isinstance(self.fail, Exception) else RuntimeError("KV channel failed")
        self.decodes[destination["address"]].start(request_id, output_offset)
        await asyncio.sleep(self.answer_delay)
        return {"first_token": 1000, "phases": {"prefill_started": 0.001, "prefill_ended": 0.002},
                "prompt_logprobs": None if params["prompt_logprobs"] is None else fake_prompt_logprobs(prompt)}  # fmt: skip

    async def _abort(self, key):
        if self.dead:
            await gone(self.freeze)
        self.aborted.append(client_id(key))
        return True

    async def _stats(self):
        if self.dead:
            await gone(self.freeze)
        return {"running": 0, "waiting": 0}

    async def _ping(self):
        if self.dead:
            await gone(self.freeze)
        return HEALTHY


def fake_prompt_logprobs(prompt: list[int]) -> list:
    """Token t has the logprob -t / 1000 and is the most likely, but for 42: second, after 41."""
    return [None] + [TokenLogprobs(-t / 1000, ((41, -0.041),), 2) if t == 42 else TokenLogprobs(-t / 1000, ((t, -t / 1000),), 1)
                     for t in prompt[1:]]  # fmt: skip


def client_id(key: str) -> str:
    """Workers see a per-request key: the client's id plus a unique suffix."""
    return key.split("#")[0]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return Tokenizer(default_model_dir)


async def start(tokenizer, workers, mode="disaggregated", **config):
    router = Router(tokenizer, MODEL.block_size, RouterConfig(mode=mode, **config))
    server = Server(router, MODEL, mode, "grpc", scale=None)
    router._on_workers_changed = lambda: asyncio.get_running_loop().create_task(server.update_health())
    port = await server.start("127.0.0.1", 0)
    for worker_id, role, handle in workers:
        router.add_worker(WorkerRecord(worker_id, role, handle, state=WorkerState.READY, free_blocks=100))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return router, server, channel


async def stop(router, server, channel):
    await channel.close()
    await server.stop(0)
    await router.stop()


async def collect(stub, request, timeout=10):
    return [r async for r in stub.Generate(request, timeout=timeout)]


def token_request(n=3, **sampling):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(100, 100 + n))), sampling=pb.SamplingParams(**sampling))


def one_token_request(request_id):
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=[5]))


def run(coro):
    return asyncio.run(coro)


def test_a_second_server_on_a_taken_port_is_refused(tokenizer):
    """gRPC's default SO_REUSEPORT would let a second cluster bind the port and take half the
    first one's new connections."""

    async def body():
        router, server, channel = await start(tokenizer, [])
        second = Server(router, MODEL, "disaggregated", "grpc", scale=None)
        with pytest.raises(RuntimeError, match="bind|cannot listen"):
            await second.start("127.0.0.1", server.port)
        await second.server.stop(None)
        await stop(router, server, channel)

    run(body())


def test_tokens_stream_back_with_usage(tokenizer):
    async def body():
        d = FakeDecode()
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))])
        d.script["r1"] = tokenizer.encode(" Hello world")
        responses = await collect(pb_grpc.GenerationStub(channel), pb.GenerateRequest(request_id="r1", prompt="Hi"))
        await stop(router, server, channel)
        return responses

    responses = run(body())
    assert "".join(r.text for r in responses) == " Hello world"
    assert responses[-1].finish_reason == "length" and responses[-1].usage.completion_tokens == 2
    assert all(not r.finish_reason for r in responses[:-1])


def test_resource_exhausted_when_no_decode_worker_can_reserve(tokenizer):
    async def body():
        d = FakeDecode(refuse=True)
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))],
                                              admission_timeout=0.3)  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(pb_grpc.GenerationStub(channel), token_request())
        await stop(router, server, channel)
        return e.value

    error = run(body())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "could reserve KV blocks" in error.details()


def test_unavailable_without_workers(tokenizer):
    async def body():
        router, server, channel = await start(tokenizer, [])
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(pb_grpc.GenerationStub(channel), token_request())
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        await stop(router, server, channel)
        return e.value, health

    error, health = run(body())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "no decode worker" in error.details()
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_prefill_that_keeps_failing_is_retried_up_to_the_limit_then_unavailable(tokenizer):
    async def body():
        d = FakeDecode()
        p = FakePrefill(d, fail=True)
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, p)], migration_limit=2)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(pb_grpc.GenerationStub(channel), token_request())
        await asyncio.sleep(0.1)
        await stop(router, server, channel)
        return e.value, d, p

    error, d, p = run(body())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "KV channel failed" in error.details() and "2 moves is the migration limit" in error.details()
    assert len(p.calls) == 3 and len(d.reserved) == 3
    assert len(d.aborted) == 3  # every attempt's reservation was dropped


SCRIPT = list(range(1000, 1012))


def test_a_request_whose_decode_worker_dies_resumes_on_another_with_nothing_lost_or_repeated(tokenizer):
    async def body():
        d1, d2 = FakeDecode(die_after_steps=4, address="fake:1"), FakeDecode(address="fake:2")
        d1.script["x"] = d2.script["x"] = SCRIPT
        workers = [("d1", Role.DECODE, d1), ("d2", Role.DECODE, d2), ("p", Role.PREFILL, FakePrefill(d1, d2))]
        router, server, channel = await start(tokenizer, workers)
        responses = await collect(pb_grpc.GenerationStub(channel), one_token_request("x"))
        state = router.workers["d1"].state
        await stop(router, server, channel)
        return responses, state, d1, d2

    responses, state, d1, d2 = run(body())
    assert [t for r in responses for t in r.token_ids] == SCRIPT
    assert responses[-1].finish_reason == "length" and responses[-1].usage.completion_tokens == len(SCRIPT)
    assert state is WorkerState.DEAD and [r[0] for r in d1.reserved] == ["x"]
    ((_, prompt, offset),) = d2.reserved  # resumed: the prompt plus what was streamed, and how many that is
    assert 0 < offset < len(SCRIPT) and prompt == [5] + SCRIPT[:offset]
    events = [e.name for e in responses[-1].timeline]
    assert events.count("reserved") == 2 and events.count("migrated") == 1 and events[-1] == "finished"
    migrated = next(e for e in responses[-1].timeline if e.name == "migrated")
    assert migrated.worker == "d1"


def test_a_frozen_decode_worker_is_taken_for_dead_and_its_request_resumes_elsewhere(tokenizer):
    """Frozen (SIGSTOP): no call is answered, and Ray reports nothing. After unresponsive_after of
    silence the worker is dead to the router: the request moves, nothing lost or repeated."""

    async def body():
        d1, d2 = FakeDecode(die_after_steps=4, address="fake:1", freeze=True), FakeDecode(address="fake:2")
        d1.script["x"] = d2.script["x"] = SCRIPT
        workers = [("d1", Role.DECODE, d1), ("d2", Role.DECODE, d2), ("p", Role.PREFILL, FakePrefill(d1, d2))]
        router, server, channel = await start(tokenizer, workers, unresponsive_after=0.5, poll_timeout=0.1)
        responses = await collect(pb_grpc.GenerationStub(channel), one_token_request("x"))
        state = router.workers["d1"].state
        await stop(router, server, channel)
        return responses, state, d2

    responses, state, d2 = run(body())
    assert [t for r in responses for t in r.token_ids] == SCRIPT and responses[-1].finish_reason == "length"
    assert state is WorkerState.DEAD and len(d2.reserved) == 1
    assert [e.worker for e in responses[-1].timeline if e.name == "migrated"] == ["d1"]


def test_a_frozen_prefill_worker_is_taken_for_dead_and_its_prompt_prefilled_elsewhere(tokenizer):
    async def body():
        d = FakeDecode()
        p1, p2 = FakePrefill(d, freeze=True), FakePrefill(d)
        p1.dead = True  # frozen from the start: its pings and the prefill are never answered
        workers = [("d", Role.DECODE, d), ("p1", Role.PREFILL, p1)]
        router, server, channel = await start(tokenizer, workers, unresponsive_after=0.5, poll_timeout=0.1, liveness_interval=0.05)
        streaming = asyncio.ensure_future(collect(pb_grpc.GenerationStub(channel), one_token_request("y")))
        while not p1.calls:
            await asyncio.sleep(0.01)
        router.add_worker(WorkerRecord("p2", Role.PREFILL, p2, state=WorkerState.READY))
        responses = await streaming
        state = router.workers["p1"].state
        await stop(router, server, channel)
        return responses, state, p1.calls, p2.calls

    responses, state, first, second = run(body())
    assert [t for r in responses for t in r.token_ids] == [1000, 1001] and responses[-1].finish_reason == "length"
    assert state is WorkerState.DEAD and first == second == ["y"]


def test_a_reservation_asked_of_a_worker_that_freezes_is_given_up_when_it_is_declared_dead(tokenizer):
    """The worker freezes with the reserve call out: once the router takes it for dead (its polls
    unanswered for unresponsive_after), the call is given up and the request reserved elsewhere,
    long before call_timeout (here past the client's deadline: waiting it out fails the request)."""

    class FreezesOnReserve(FakeDecode):
        async def _reserve(self, *args):
            self.die_after_steps = 0  # from now on no call is answered
            await gone(True)

    async def body():
        d1, d2 = FreezesOnReserve(address="fake:1"), FakeDecode(address="fake:2")
        workers = [("d1", Role.DECODE, d1), ("d2", Role.DECODE, d2), ("p", Role.PREFILL, FakePrefill(d1, d2))]
        router, server, channel = await start(tokenizer, workers, unresponsive_after=0.5, poll_timeout=0.1, call_timeout=120)
        router.workers["d2"].free_blocks = 50  # d1, the roomier, is asked first
        responses = await collect(pb_grpc.GenerationStub(channel), one_token_request("z"), timeout=60)
        state = router.workers["d1"].state
        await stop(router, server, channel)
        return responses, state, d2

    responses, state, d2 = run(body())
    assert [t for r in responses for t in r.token_ids] == [1000, 1001] and responses[-1].finish_reason == "length"
    assert state is WorkerState.DEAD and [r[0] for r in d2.reserved] == ["z"]


def test_stop_strings_and_usage_stay_right_across_a_move(tokenizer):
    async def body():
        d1, d2 = FakeDecode(die_after_steps=3, address="fake:1"), FakeDecode(address="fake:2")
        d1.script["s"] = d2.script["s"] = tokenizer.encode(" one two three four five six")
        workers = [("d1", Role.DECODE, d1), ("d2", Role.DECODE, d2), ("p", Role.PREFILL, FakePrefill(d1, d2))]
        router, server, channel = await start(tokenizer, workers)
        request = pb.GenerateRequest(request_id="s", prompt="Count", sampling=pb.SamplingParams(stop=[" five"]))
        responses = await collect(pb_grpc.GenerationStub(channel), request)
        await stop(router, server, channel)
        return responses, d2

    responses, d2 = run(body())
    assert "".join(r.text for r in responses) == " one two three four" and responses[-1].finish_reason == "stop"
    streamed = [t for r in responses for t in r.token_ids]
    assert streamed == tokenizer.encode(" one two three four five") and responses[-1].usage.completion_tokens == len(streamed)
    assert len(d2.reserved) == 1 and "migrated" in [e.name for e in responses[-1].timeline]


@pytest.mark.parametrize("script", [SCRIPT, SCRIPT[:2]], ids=["long", "done-before-the-answer"])
def test_prompt_logprobs_come_first_on_the_first_response(tokenizer, script):
    """The prefill's answer (with the prompt logprobs) comes 0.3 s after the decode worker's
    first tokens: those are held, then sent with the prompt logprobs on one first response; a
    request that ends before the answer ends after it. Later responses carry none."""

    async def body():
        d = FakeDecode()
        d.script["p"] = script
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d, answer_delay=0.3))])
        request = pb.GenerateRequest(request_id="p", token_ids=pb.TokenIds(ids=[5, 17, 42]), sampling=pb.SamplingParams(prompt_logprobs=1))
        responses = await collect(pb_grpc.GenerationStub(channel), request)
        await stop(router, server, channel)
        return responses

    responses = run(body())
    assert [t for r in responses for t in r.token_ids] == script and responses[-1].finish_reason == "length"
    first, *rest = responses
    assert [(round(lp.logprob, 6), [(t.token_id, round(t.logprob, 6)) for t in lp.top], lp.rank) for lp in first.prompt_logprobs] == [
        (-0.017, [(17, -0.017)], 1), (-0.042, [(41, -0.041)], 2)]  # fmt: skip
    assert len(first.token_ids) >= 2 and all(not r.prompt_logprobs for r in rest)


def test_a_lost_node_costs_a_request_one_move_not_one_per_worker_it_held(tokenizer):
    """Four prefill workers of a node are gone, idle, still READY to the router (nothing has called
    them); a healthy one elsewhere is busier. The first call finds one dead: the others of its node
    are asked at once, found dead too, and the request goes to the healthy one, one move spent
    (migration_limit 2: four dead tries would have failed it)."""

    async def body():
        d = FakeDecode()
        lost = [FakePrefill(d) for _ in range(4)]
        healthy = FakePrefill(d)
        workers = [("d", Role.DECODE, d), *((f"p{i}", Role.PREFILL, p) for i, p in enumerate(lost)), ("p4", Role.PREFILL, healthy)]
        router, server, channel = await start(tokenizer, workers, migration_limit=2)
        for i, p in enumerate(lost):
            p.dead = True
            router.workers[f"p{i}"].node_id = "lost-node"
        router.workers["p4"].node_id = router.workers["d"].node_id = "other-node"
        router.workers["p4"].queued_tokens = 10_000  # the least loaded are the lost node's
        responses = await collect(pb_grpc.GenerationStub(channel), one_token_request("n"))
        states = {w.id: w.state for w in router.workers.values()}
        await stop(router, server, channel)
        return responses, states, [len(p.calls) for p in lost], healthy.calls

    responses, states, lost_calls, healthy_calls = run(body())
    assert [t for r in responses for t in r.token_ids] == [1000, 1001] and responses[-1].finish_reason == "length"
    assert sum(lost_calls) == 1 and healthy_calls == ["n"]
    assert [states[f"p{i}"] for i in range(4)] == [WorkerState.DEAD] * 4 and states["p4"] is WorkerState.READY


def test_checking_a_dead_workers_siblings_is_no_outage(tokenizer):
    """On one node every worker is a sibling: while they answer their check the cluster stays
    SERVING, and once they have they take work again."""

    async def body():
        d1, d2 = FakeDecode(address="d1:1"), FakeDecode(address="d2:1")
        router, server, channel = await start(tokenizer, [("d1", Role.DECODE, d1), ("d2", Role.DECODE, d2), ("p", Role.PREFILL, FakePrefill(d1, d2))])
        for w in router.workers.values():
            w.node_id = "the-node"
        router._worker_died(router.workers["d1"], RuntimeError("SIGKILL"))
        during = (router.serving(), router.workers["d2"].checking, router.workers["p"].checking)
        await asyncio.sleep(0.2)
        after = (router.serving(), router.workers["d2"].checking, router.workers["p"].checking)
        responses = await collect(pb_grpc.GenerationStub(channel), one_token_request("after"))
        await stop(router, server, channel)
        return during, after, responses

    during, after, responses = run(body())
    assert during == (True, True, True) and after == (True, False, False)
    assert [t for r in responses for t in r.token_ids] == [1000, 1001]


def test_a_long_prompts_logprobs_are_split_over_the_first_responses(tokenizer, monkeypatch):
    """At most PROMPT_LOGPROBS_PER_RESPONSE to a response (a gRPC client receives 4 MiB by
    default): the pieces come first, in order, and the last rides with the first tokens."""
    monkeypatch.setattr("router.server.PROMPT_LOGPROBS_PER_RESPONSE", 2)
    prompt = [5, 17, 42, 8, 9, 10]

    async def body():
        d = FakeDecode()
        d.script["p"] = SCRIPT
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))])
        request = pb.GenerateRequest(request_id="p", token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(prompt_logprobs=0))
        responses = await collect(pb_grpc.GenerationStub(channel), request)
        await stop(router, server, channel)
        return responses

    responses = run(body())
    assert [len(r.prompt_logprobs) for r in responses[:3]] == [2, 2, 1] and not any(r.prompt_logprobs for r in responses[3:])
    assert not responses[0].token_ids and not responses[1].token_ids and responses[2].token_ids
    assert [round(lp.logprob, 6) for r in responses for lp in r.prompt_logprobs] == [-t / 1000 for t in prompt[1:]]
    assert [t for r in responses for t in r.token_ids] == SCRIPT


def test_an_attempt_lost_before_its_prompt_logprobs_came_starts_over_from_the_prompt(tokenizer):
    """Nothing is sent before the prompt logprobs, so a decode worker that dies first costs the
    request a fresh start (from the prompt, on another worker), not a resume: the client gets
    each token once."""

    async def body():
        d1, d2 = FakeDecode(die_after_steps=2, address="fake:1"), FakeDecode(address="fake:2")
        d1.script["x"] = d2.script["x"] = SCRIPT
        workers = [("d1", Role.DECODE, d1), ("d2", Role.DECODE, d2), ("p", Role.PREFILL, FakePrefill(d1, d2, answer_delay=0.5))]
        router, server, channel = await start(tokenizer, workers)
        request = pb.GenerateRequest(request_id="x", token_ids=pb.TokenIds(ids=[5, 6]), sampling=pb.SamplingParams(prompt_logprobs=0))
        responses = await collect(pb_grpc.GenerationStub(channel), request)
        await stop(router, server, channel)
        return responses, d2

    responses, d2 = run(body())
    assert [t for r in responses for t in r.token_ids] == SCRIPT and len(responses[0].prompt_logprobs) == 1
    assert d2.reserved == [("x", [5, 6], 0)] and "migrated" in [e.name for e in responses[-1].timeline]


def test_past_the_migration_limit_the_request_is_unavailable_with_the_reason(tokenizer):
    async def body():
        d1, d2 = FakeDecode(die_after_steps=3, address="fake:1"), FakeDecode(address="fake:2")
        d1.script["x"] = SCRIPT
        workers = [("d1", Role.DECODE, d1), ("d2", Role.DECODE, d2), ("p", Role.PREFILL, FakePrefill(d1, d2))]
        router, server, channel = await start(tokenizer, workers, migration_limit=0)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(pb_grpc.GenerationStub(channel), pb.GenerateRequest(request_id="x", token_ids=pb.TokenIds(ids=[5])))
        await stop(router, server, channel)
        return e.value, d2

    error, d2 = run(body())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode worker d1 died" in error.details() and "0 moves is the migration limit" in error.details()
    assert d2.reserved == []


def test_when_the_only_decode_worker_dies_and_none_comes_back_the_request_is_unavailable(tokenizer):
    async def body():
        d = FakeDecode(die_after_steps=2)
        d.script["x"] = SCRIPT
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))],
                                              admission_timeout=0.3)  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(pb_grpc.GenerationStub(channel), pb.GenerateRequest(request_id="x", token_ids=pb.TokenIds(ids=[5])))
        await stop(router, server, channel)
        return e.value

    error = run(body())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "lost its worker" in error.details()


def test_a_colocated_request_whose_worker_dies_is_resubmitted_elsewhere(tokenizer):
    async def body():
        w1, w2 = FakeDecode(die_after_steps=3), FakeDecode()
        w1.script["c"] = w2.script["c"] = SCRIPT
        workers = [("w1", Role.COLOCATED, w1), ("w2", Role.COLOCATED, w2)]
        router, server, channel = await start(tokenizer, workers, mode="colocated")
        responses = await collect(pb_grpc.GenerationStub(channel), one_token_request("c"))
        await stop(router, server, channel)
        return responses, w2

    responses, w2 = run(body())
    assert [t for r in responses for t in r.token_ids] == SCRIPT and responses[-1].finish_reason == "length"
    ((_, prompt, offset),) = w2.reserved
    assert prompt == [5] + SCRIPT[:offset] and offset > 0


def test_simultaneous_requests_spread_over_the_decode_workers(tokenizer):
    async def body():
        d1, d2 = FakeDecode(address="fake:1", answer_delay=0.05), FakeDecode(address="fake:2", answer_delay=0.05)
        workers = [("d1", Role.DECODE, d1), ("d2", Role.DECODE, d2), ("p", Role.PREFILL, FakePrefill(d1, d2))]
        router, server, channel = await start(tokenizer, workers)
        stub = pb_grpc.GenerationStub(channel)
        results = await asyncio.gather(*(collect(stub, token_request()) for _ in range(16)))
        await stop(router, server, channel)
        return results, d1, d2

    results, d1, d2 = run(body())
    assert all(r[-1].finish_reason == "length" for r in results)
    assert (len(d1.reserved), len(d2.reserved)) == (8, 8)  # every reservation was in flight at once


def test_overload_is_refused_at_once_beyond_the_waiting_queue_and_admitted_first_come_first_served(tokenizer):
    """Room for 4 requests, 4 more may wait: of 30 arriving one after another, the first 8 are
    served (the 4 that waited in arrival order), the other 22 get RESOURCE_EXHAUSTED with no
    reserve call ever refused (the router knew there was no room)."""

    async def body():
        d = FakeDecode(capacity=4)
        d.script = {f"r{i}": list(range(1000, 1030)) for i in range(30)}  # long enough to outlast the arrivals
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))],
                                              max_waiting_requests=4)  # fmt: skip
        router.workers["d"].max_num_seqs = 4
        stub = pb_grpc.GenerationStub(channel)

        async def one(i):
            try:
                return await collect(stub, pb.GenerateRequest(request_id=f"r{i}", token_ids=pb.TokenIds(ids=[5])))
            except grpc.aio.AioRpcError as e:
                return e

        tasks = []
        for i in range(30):  # a defined arrival order: each is in the router before the next is sent
            tasks.append(asyncio.create_task(one(i)))
            while f"r{i}" not in router.requests and not tasks[-1].done():
                await asyncio.sleep(0.001)
        results = await asyncio.gather(*tasks)
        await stop(router, server, channel)
        return results, d

    results, d = run(body())
    served = [i for i, r in enumerate(results) if not isinstance(r, grpc.aio.AioRpcError)]
    refused = [i for i, r in enumerate(results) if isinstance(r, grpc.aio.AioRpcError)]
    assert served == list(range(8)) and refused == list(range(8, 30))
    for i in refused:
        assert results[i].code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "already waiting" in results[i].details()
    assert all(results[i][-1].finish_reason == "length" for i in served)
    assert [r[0] for r in d.reserved] == [f"r{i}" for i in range(8)]  # in arrival order, none refused


def test_the_last_response_carries_the_timeline(tokenizer):
    async def body():
        d = FakeDecode()
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))])
        responses = await collect(pb_grpc.GenerationStub(channel), token_request())
        await stop(router, server, channel)
        return responses

    responses = run(body())
    timeline = responses[-1].timeline
    assert [e.name for e in timeline] == ["arrived", "reserved", "prefill_queued", "prefill_started", "prefill_ended",
                                          "first_token", "finished"]  # fmt: skip
    assert [e.worker for e in timeline] == ["", "d", "p", "p", "p", "d", "d"]
    assert all(a.seconds <= b.seconds for a, b in zip(timeline, timeline[1:]))
    assert not any(r.timeline for r in responses[:-1])


def test_phase_durations_pair_each_end_with_its_latest_start():
    from router.phases import PhaseEvent, phase_durations

    timeline = [PhaseEvent(n, t) for n, t in [("arrived", 0), ("reserved", 1), ("prefill_queued", 1), ("prefill_started", 2),
                                              ("prefill_ended", 4), ("first_token", 5), ("migrated", 7), ("reserved", 8),
                                              ("first_token", 10), ("finished", 12)]]  # fmt: skip
    assert phase_durations(timeline) == [("queue", 1), ("prefill_queue", 1), ("prefill", 2), ("decode", 2), ("queue", 1),
                                         ("recovery", 3), ("decode", 2)]  # fmt: skip


def test_stop_string_ends_the_stream_and_aborts_the_decode_worker(tokenizer):
    async def body():
        d = FakeDecode()
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))])
        d.script["s"] = tokenizer.encode("one two three four five")
        request = pb.GenerateRequest(request_id="s", prompt="Count", sampling=pb.SamplingParams(stop=[" three"]))
        responses = await collect(pb_grpc.GenerationStub(channel), request)
        await asyncio.sleep(0.1)
        await stop(router, server, channel)
        return responses, d

    responses, d = run(body())
    assert "".join(r.text for r in responses) == "one two"
    assert responses[-1].finish_reason == "stop" and d.aborted == ["s"]


def test_a_stop_string_found_while_prompt_logprobs_are_awaited_ends_the_stream_there(tokenizer):
    """The decode worker streams past the stop string before the prefill's answer (with the prompt
    logprobs) comes: the stream ends with the text up to the stop, and the worker is aborted at
    once, not left decoding until the answer."""

    async def body():
        d = FakeDecode()
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d, answer_delay=0.5))])
        d.script["s"] = tokenizer.encode("one two three four five six seven")
        request = pb.GenerateRequest(request_id="s", prompt="Count to ten", sampling=pb.SamplingParams(stop=[" three"], prompt_logprobs=1))
        streaming = asyncio.ensure_future(collect(pb_grpc.GenerationStub(channel), request))
        while not d.aborted and not streaming.done():
            await asyncio.sleep(0.01)
        aborted_before_the_answer = not streaming.done()
        responses = await streaming
        await stop(router, server, channel)
        return responses, aborted_before_the_answer

    responses, aborted_early = run(body())
    assert "".join(r.text for r in responses) == "one two" and responses[-1].finish_reason == "stop"
    assert [t for r in responses for t in r.token_ids] == tokenizer.encode("one two three")
    assert responses[0].prompt_logprobs and aborted_early


def test_a_sequence_whose_abort_did_not_get_through_is_aborted_when_its_tokens_come(tokenizer):
    """The router let go of the attempt (a stop string) and its abort failed (the worker's call
    slots full, a timeout): the worker decodes on, and its next tokens for the attempt nobody
    reads make the router abort it again, not leave it holding its blocks to max_tokens."""

    class DropsFirstAbort(FakeDecode):
        async def _abort(self, key):
            self.attempts = getattr(self, "attempts", 0) + 1
            if self.attempts == 1:
                raise RuntimeError("no slot")
            return await super()._abort(key)

    async def body():
        d = DropsFirstAbort()
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))])
        d.script["s"] = tokenizer.encode("one two three four five six seven eight nine ten")
        request = pb.GenerateRequest(request_id="s", prompt="Count", sampling=pb.SamplingParams(stop=[" three"]))
        responses = await collect(pb_grpc.GenerationStub(channel), request)
        while d.outbox:  # polled away one token at a time, unless an abort takes the rest
            await asyncio.sleep(0.01)
        await stop(router, server, channel)
        return responses, d

    responses, d = run(body())
    assert "".join(r.text for r in responses) == "one two" and responses[-1].finish_reason == "stop"
    assert d.attempts == 2 and d.aborted == ["s"] and d.steps < 9  # 3 tokens streamed, then at most a poll's worth more


def test_abort_rpc_ends_the_stream(tokenizer):
    async def body():
        d = FakeDecode()
        d.script["a"] = list(range(1000, 1100))
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))])
        stub = pb_grpc.GenerationStub(channel)
        stream = stub.Generate(pb.GenerateRequest(request_id="a", token_ids=pb.TokenIds(ids=[5])))
        first = await stream.read()
        found = await stub.Abort(pb.AbortRequest(request_id="a"))
        rest = []
        while (r := await stream.read()) != grpc.aio.EOF:
            rest.append(r)
        missing = await stub.Abort(pb.AbortRequest(request_id="nope"))
        await stop(router, server, channel)
        return first, found, rest, missing, d

    first, found, rest, missing, d = run(body())
    assert first.token_ids and found.found and not missing.found
    assert rest[-1].finish_reason == "abort" and "a" in d.aborted


def test_colocated_mode_sends_the_whole_request_to_one_worker(tokenizer):
    async def body():
        w = FakeDecode()
        w.script["c"] = [7, 8, 9]
        router, server, channel = await start(tokenizer, [("w", Role.COLOCATED, w)], mode="colocated")
        responses = await collect(pb_grpc.GenerationStub(channel), pb.GenerateRequest(request_id="c", token_ids=pb.TokenIds(ids=[5])))
        serving = router.serving()
        await stop(router, server, channel)
        return responses, serving

    responses, serving = run(body())
    assert [t for r in responses for t in r.token_ids] == [7, 8, 9] and serving


def test_health_follows_the_pools(tokenizer):
    async def body():
        d = FakeDecode()
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d)])
        check = health_pb2_grpc.HealthStub(channel).Check
        statuses = [(await check(health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"))).status]
        router.add_worker(WorkerRecord("p", Role.PREFILL, FakePrefill(d), state=WorkerState.READY))
        await asyncio.sleep(0.05)
        statuses.append((await check(health_pb2.HealthCheckRequest(service=""))).status)
        router.set_state("d", WorkerState.DRAINING)
        await asyncio.sleep(0.05)
        statuses.append((await check(health_pb2.HealthCheckRequest(service=""))).status)
        await stop(router, server, channel)
        return statuses

    S = health_pb2.HealthCheckResponse
    assert run(body()) == [S.NOT_SERVING, S.SERVING, S.NOT_SERVING]


def test_prompts_sharing_a_prefix_go_to_the_prefill_worker_that_has_it(tokenizer):
    async def body():
        d = FakeDecode()
        p1, p2 = FakePrefill(d), FakePrefill(d)
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p1", Role.PREFILL, p1), ("p2", Role.PREFILL, p2)])
        stub = pb_grpc.GenerationStub(channel)
        shared = list(range(1000, 1000 + 160))  # 10 blocks
        for i, suffix in enumerate([[7], [8, 9], [10]]):
            await collect(stub, pb.GenerateRequest(request_id=f"s{i}", token_ids=pb.TokenIds(ids=shared + suffix)))
        router.workers["p1" if p1.calls else "p2"].queued_tokens = 10**6  # now the cache holder is swamped
        await collect(stub, pb.GenerateRequest(request_id="s3", token_ids=pb.TokenIds(ids=shared + [11])))
        await stop(router, server, channel)
        return p1.calls, p2.calls

    p1_calls, p2_calls = run(body())
    holder, other = (p1_calls, p2_calls) if "s0" in p1_calls else (p2_calls, p1_calls)
    assert holder[:3] == ["s0", "s1", "s2"] and other == ["s3"]


def test_cancel_during_reserve_still_frees_the_reservation(tokenizer):
    async def body():
        d = FakeDecode(answer_delay=0.3)
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))])
        call = pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(request_id="r", token_ids=pb.TokenIds(ids=[5])))
        await asyncio.sleep(0.1)  # the reserve() call is out
        call.cancel()
        await asyncio.sleep(0.5)  # it returns a reservation after all
        await stop(router, server, channel)
        return d.aborted

    assert run(body()) == ["r"]


def test_a_reused_request_id_never_reaches_the_previous_requests_work(tokenizer):
    async def body():
        d = FakeDecode()
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))])
        stub = pb_grpc.GenerationStub(channel)
        d.script["same"] = [7, 8]
        first = await collect(stub, pb.GenerateRequest(request_id="same", token_ids=pb.TokenIds(ids=[5])))
        d.outbox.append(("same#stale-incarnation", [99], "abort", None, None, None))  # a late output of an old one
        second = await collect(stub, pb.GenerateRequest(request_id="same", token_ids=pb.TokenIds(ids=[5])))
        await stop(router, server, channel)
        return first, second

    first, second = run(body())
    assert [t for r in first for t in r.token_ids] == [7, 8] == [t for r in second for t in r.token_ids]
    assert second[-1].finish_reason == "length"


def test_tokens_a_colocated_worker_sends_before_submit_answers_are_kept(tokenizer):
    async def body():
        w = FakeDecode(answer_delay=0.3)
        w.script["c"] = [7, 8, 9]
        router, server, channel = await start(tokenizer, [("w", Role.COLOCATED, w)], mode="colocated")
        responses = await collect(pb_grpc.GenerationStub(channel), pb.GenerateRequest(request_id="c", token_ids=pb.TokenIds(ids=[5])))
        await stop(router, server, channel)
        return responses

    responses = run(body())
    assert [t for r in responses for t in r.token_ids] == [7, 8, 9] and responses[-1].finish_reason == "length"


def test_abort_reaches_a_request_waiting_for_kv_room(tokenizer):
    async def body():
        d = FakeDecode(refuse=True)
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))],
                                              admission_timeout=60)  # fmt: skip
        stub = pb_grpc.GenerationStub(channel)
        stream = stub.Generate(pb.GenerateRequest(request_id="w", token_ids=pb.TokenIds(ids=[5])), timeout=10)
        await asyncio.sleep(0.2)  # every decode worker has refused once: it waits for room
        found = await stub.Abort(pb.AbortRequest(request_id="w"))
        responses = [r async for r in stream]
        prefill_calls = router.workers["p"].handle.calls
        await stop(router, server, channel)
        return found, responses, prefill_calls

    found, responses, prefill_calls = run(body())
    assert found.found and responses[-1].finish_reason == "abort" and prefill_calls == []


def test_an_idle_prefill_worker_that_dies_leaves_the_pool(tokenizer):
    async def body():
        d = FakeDecode()
        p = FakePrefill(d)
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, p)], liveness_interval=0.05)
        check = health_pb2_grpc.HealthStub(channel).Check
        statuses = [(await check(health_pb2.HealthCheckRequest(service=""))).status]
        p.dead = True
        await asyncio.sleep(0.3)
        statuses.append((await check(health_pb2.HealthCheckRequest(service=""))).status)
        state = router.workers["p"].state
        await stop(router, server, channel)
        return statuses, state

    S = health_pb2.HealthCheckResponse
    assert run(body()) == ([S.SERVING, S.NOT_SERVING], WorkerState.DEAD)



def test_a_pool_being_restored_is_waited_for_and_reported_short(tokenizer):
    """No decode worker ready, but the cluster asks for one (supervision is restoring the pool): a
    new request waits and is served once a worker is ready; status and the pool's health say the
    pool is short meanwhile. Past the admission timeout it is UNAVAILABLE (not RESOURCE_EXHAUSTED)."""

    async def body():
        d = FakeDecode()
        router, server, channel = await start(tokenizer, [("p", Role.PREFILL, FakePrefill(d))], admission_timeout=1.0)
        router.set_target(Role.PREFILL, 1)
        router.set_target(Role.DECODE, 1)
        stub, check = pb_grpc.GenerationStub(channel), health_pb2_grpc.HealthStub(channel).Check
        pool_health = lambda: check(health_pb2.HealthCheckRequest(service="pdserve.v1.pool.decode"))  # noqa: E731
        waiting = asyncio.create_task(collect(stub, token_request()))
        await asyncio.sleep(0.3)
        short, short_health = await stub.GetClusterState(pb.GetClusterStateRequest()), (await pool_health()).status
        router.add_worker(WorkerRecord("d", Role.DECODE, d, state=WorkerState.READY, free_blocks=100))
        responses = await waiting
        await asyncio.sleep(0.05)
        whole_health = (await pool_health()).status
        router.remove_worker("d")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(stub, token_request())
        await stop(router, server, channel)
        return short, (short_health, whole_health), responses, e.value

    short, health, responses, error = run(body())
    S = health_pb2.HealthCheckResponse
    assert {p.name: (p.target, p.ready) for p in short.pools} == {"prefill": (1, 1), "decode": (1, 0)}
    assert health == (S.NOT_SERVING, S.SERVING) and responses[-1].finish_reason == "length"
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "pool is short" in error.details()
def test_a_stream_behind_gets_the_steps_waiting_for_it_in_one_chunk():
    """Tokens of one attempt queued back to back become one event (the oldest step's time, the
    last one's finish); another attempt's tokens, or a loss, are not merged into it."""
    from collections import deque

    from router.router import _Lost, _next_event, _Tokens

    events = deque([_Tokens("a", [1], None, step_time=1.0), _Tokens("a", [2, 3], None, step_time=2.0),
                    _Tokens("a", [4], "length", step_time=3.0), _Tokens("a", [5], None), _Tokens("b", [6], None),
                    _Lost("b", "died", "gone")])  # fmt: skip
    first = _next_event(events)
    assert (first.key, first.token_ids, first.finish_reason, first.step_time) == ("a", [1, 2, 3, 4], "length", 1.0)
    assert _next_event(events).token_ids == [5] and _next_event(events).token_ids == [6]
    assert isinstance(_next_event(events), _Lost) and not events


def test_stream_interval_sends_the_first_token_at_once_then_several_a_response(tokenizer):
    async def body():
        d = FakeDecode()
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))],
                                              stream_interval=3)  # fmt: skip
        d.script["r1"] = tokenizer.encode(" one two three four five six seven eight")
        responses = await collect(pb_grpc.GenerationStub(channel), pb.GenerateRequest(request_id="r1", prompt="Hi"))
        await stop(router, server, channel)
        return responses, d.script["r1"]

    responses, script = run(body())
    assert [len(r.token_ids) for r in responses] == [1, 3, 3, 1]  # 8 tokens: first, 3, 3, and the last at its finish
    assert [t for r in responses for t in r.token_ids] == script
    assert "".join(r.text for r in responses) == " one two three four five six seven eight"
    assert responses[-1].finish_reason == "length" and responses[-1].usage.completion_tokens == 8


def test_a_stream_with_no_progress_for_its_stall_timeout_is_unavailable_and_aborted_on_its_worker(tokenizer):
    """The decode worker accepts the request and then never sends a token: after stall_timeout the
    request moves (here to the same worker, the only one) and, once its moves are spent, the
    client gets UNAVAILABLE naming the stall; the worker is told to abort each attempt, and the
    router holds nothing of it. A stream that does progress, beside it, is not touched."""

    class Silent(FakeDecode):
        def start(self, key, output_offset=0):
            if client_id(key) != "silent":
                super().start(key, output_offset)

    async def body():
        d = Silent()
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))],
                                              stall_timeout=1.0, prefill_timeout=1.0, migration_limit=1)  # fmt: skip
        stub = pb_grpc.GenerationStub(channel)
        d.script["busy"] = list(range(1000, 1200))  # 200 polls of 10 ms: it outlives the silent one's timeout
        silent = asyncio.ensure_future(collect(stub, one_token_request("silent")))
        busy = await collect(stub, one_token_request("busy"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await silent
        left = dict(router.requests)
        await stop(router, server, channel)
        return e.value, busy, d.aborted, left

    error, busy, aborted, left = run(body())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "no progress on the request for 1s" in error.details()
    assert "migration limit" in error.details()
    assert [t for r in busy for t in r.token_ids] == list(range(1000, 1200))
    assert "silent" in aborted and not left


def test_a_request_stalled_on_a_hung_worker_moves_to_another(tokenizer):
    """A decode worker that answers its polls but whose engine makes no progress (a hung step):
    after stall_timeout the request moves and ends on the other worker, as if nothing happened."""

    class Hung(FakeDecode):
        def start(self, key, output_offset=0):
            pass  # accepted, never a token

    async def body():
        hung, healthy = Hung(address="hung:1"), FakeDecode(address="healthy:1")
        router, server, channel = await start(tokenizer, [("a-hung", Role.DECODE, hung), ("b-healthy", Role.DECODE, healthy),
                                                          ("p", Role.PREFILL, FakePrefill(hung, healthy))], stall_timeout=1.0, prefill_timeout=1.0)  # fmt: skip
        router.workers["b-healthy"].free_blocks = 50  # the hung one looks roomier: it is chosen first
        responses = await collect(pb_grpc.GenerationStub(channel), one_token_request("h"))
        await stop(router, server, channel)
        return responses, hung.aborted

    responses, aborted = run(body())
    assert [t for r in responses for t in r.token_ids] == [1000, 1001] and responses[-1].finish_reason == "length"
    # (the move may choose the hung worker again, as roomier, before the other's load report says otherwise)
    assert "migrated" in [e.name for e in responses[-1].timeline] and set(aborted) == {"h"}


def test_a_worker_whose_step_hangs_is_taken_for_dead_and_chosen_no_more(tokenizer):
    """Its actor answers, but one engine step has run for stall_timeout (a GPU hang): the worker is
    dead to the router, so its request moves and the next request is not sent to it."""

    class HungStep(FakeDecode):
        started = None

        def start(self, key, output_offset=0):
            self.started = time.monotonic()  # the step that would compute the request never ends

        def health(self):
            return {"alive": True, "step_seconds": 0.0 if self.started is None else time.monotonic() - self.started}

    async def body():
        hung, healthy = HungStep(address="hung:1"), FakeDecode(address="healthy:1")
        router, server, channel = await start(tokenizer, [("a-hung", Role.DECODE, hung), ("b-healthy", Role.DECODE, healthy),
                                                          ("p", Role.PREFILL, FakePrefill(hung, healthy))], stall_timeout=1.0)  # fmt: skip
        router.workers["b-healthy"].free_blocks = 50  # the hung one looks roomier: it is chosen first
        stub = pb_grpc.GenerationStub(channel)
        first = await collect(stub, one_token_request("h1"))
        second = await collect(stub, one_token_request("h2"))
        state = router.workers["a-hung"].state
        await stop(router, server, channel)
        return first, second, state, hung.reserved

    first, second, state, reserved = run(body())
    assert [t for r in first for t in r.token_ids] == [t for r in second for t in r.token_ids] == [1000, 1001]
    assert [e.name for e in first[-1].timeline].count("migrated") == 1 and "migrated" not in [e.name for e in second[-1].timeline]
    assert state is WorkerState.DEAD and [r[0] for r in reserved] == ["h1"]


def test_a_removed_worker_leaves_no_series_or_call_slots_behind(tokenizer):
    """Replaced and scaled-away workers come and go for the cluster's life: what the router keeps
    per worker must go with them, or it grows without end."""
    from prometheus_client import generate_latest

    from router.metrics import Metrics

    async def body():
        metrics = Metrics()
        router = Router(tokenizer, MODEL.block_size, RouterConfig(), metrics=metrics)
        d = FakeDecode()
        router.add_worker(WorkerRecord("d", Role.DECODE, d, state=WorkerState.READY))
        await router._call(router.workers["d"], "stats")
        metrics.latencies("decode", "d")[0].observe(0.1)
        before = 'worker="d"' in generate_latest(metrics.registry).decode() and "d" in router._slots
        router.remove_worker("d")
        await router._call(WorkerRecord("d", Role.DECODE, d), "abort", "late")  # an abort after the removal
        after = 'worker="d"' in generate_latest(metrics.registry).decode() or "d" in router._slots
        await router.stop()
        return before, after

    assert run(body()) == (True, False)




QUIET = 8.0  # seconds without data: the default policy cut such a client off within 6


def test_a_client_that_keeps_its_connection_alive_with_pings_is_not_cut_off(tokenizer):
    """No data for seconds (here the reservation takes QUIET s) while the client pings every 0.5 s:
    gRPC's default server policy counts those pings as abuse and closes the connection (GOAWAY
    too_many_pings, the stream UNAVAILABLE); ours lets them through."""
    pinging = [("grpc.keepalive_time_ms", 500), ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]

    async def body():
        d = FakeDecode(answer_delay=QUIET)
        router, server, channel = await start(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))])
        await channel.close()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=pinging) as pinged:
            responses = await collect(pb_grpc.GenerationStub(pinged), one_token_request("quiet"))
        await stop(router, server, channel)  # closed already: the pinging channel replaced it
        return responses

    assert run(body())[-1].finish_reason == "length"

"""The public gRPC server: pdserve.v1.Generation and Admin, grpc.health.v1 health, reflection.
A thin adapter: requests become a RequestSpec for the one validation (router.validation) and go
to the Router, as the OpenAI HTTP front end's do.

Status codes: INVALID_ARGUMENT (bad input, with the reason; bytes that do not parse as the
request too), RESOURCE_EXHAUSTED (the cluster and its waiting queue are full, or no KV room
within the admission timeout), UNAVAILABLE (no ready worker, shutting down, or a request that
could not be moved again after its worker died), DEADLINE_EXCEEDED and CANCELLED (grpc's own,
when the client's deadline passes or it cancels), UNAUTHENTICATED (no valid API key, when keys
are on), PERMISSION_DENIED (Admin without an admin key), INTERNAL (a bug: logged). TLS when a
certificate is given.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc
from router.auth import Auth
from router.router import RequestError, Router
from router.validation import InvalidRequest, ModelLimits, RequestSpec, check_request_id, off_the_loop, validate

logger = logging.getLogger(__name__)

SERVICES = ("pdserve.v1.Generation", "pdserve.v1.Admin")
ADMIN = "pdserve.v1.Admin"
POOL_HEALTH = "pdserve.v1.pool."  # + a pool's name: SERVING while it has every worker asked for ready
# A long prompt's logprobs go in several responses: at 20 top tokens each, ~18k prompt tokens in
# one would pass the 4 MiB a gRPC client receives by default. 2,048 tokens: ~0.5 MiB at most.
PROMPT_LOGPROBS_PER_RESPONSE = 2048


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    block_size: int


# ({"prefill": n, "decode": m}, {"prefill": (min, max)}) -> resized, or the planner's bounds set
Scaler = Callable[[dict[str, int], dict[str, tuple[int | None, int | None]]], Awaitable[None]]
POOLS = ("prefill", "decode", "colocated")


def request_spec(request: pb.GenerateRequest) -> RequestSpec:
    kind, s = request.WhichOneof("input"), request.sampling
    optional = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                "seed", "logprobs", "prompt_logprobs", "mock_output_len")  # fmt: skip

    def field(message, name, unset):
        return getattr(message, name) if message.HasField(name) else unset

    return RequestSpec(
        prompt=request.prompt if kind == "prompt" else None,
        messages=tuple({"role": m.role, "content": m.content} for m in request.messages.messages) if kind == "messages" else None,
        token_ids=tuple(request.token_ids.ids) if kind == "token_ids" else None,
        stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos, min_tokens=s.min_tokens,
        logit_bias=tuple(sorted(s.logit_bias.items())), include_stop_str_in_output=s.include_stop_str_in_output,
        allowed_token_ids=tuple(s.allowed_token_ids) or None, bad_words=tuple(s.bad_words),
        skip_special_tokens=field(s, "skip_special_tokens", True), add_generation_prompt=field(request, "add_generation_prompt", True),
        continue_final_message=request.continue_final_message, truncate_prompt_tokens=field(request, "truncate_prompt_tokens", None),
        **{name: field(s, name, None) for name in optional},
    )  # fmt: skip


def _pieces(items: list, size: int) -> list[list]:
    """items in consecutive pieces of at most size (one, empty, when there are none)."""
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


def _token_logprobs(lp) -> pb.TokenLogprobs:
    """A mock engine has no logits: its logprobs are None, sent as an empty message."""
    if lp is None:
        return pb.TokenLogprobs()
    return pb.TokenLogprobs(logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top], rank=lp.rank)


def caller_of(context, auth: Auth) -> str:
    """The caller's key id (the interceptor has already refused calls without a valid key)."""
    return auth.caller(dict(context.invocation_metadata() or ()).get("authorization")) or ""


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, model: ModelInfo, mode: str, transfer: str, auth: Auth = Auth()):
        self.router = router
        self.model = model
        self.limits = ModelLimits(model.max_model_len, model.vocab_size)
        self.mode, self.transfer = mode, transfer
        self.auth = auth
        self.planner: Callable[[], dict | None] = lambda: None  # the autoscaler's status, if one runs
        self.engine = ""

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            request_id = check_request_id(request.request_id) or uuid.uuid4().hex
            spec = request_spec(request)
            prompt_ids, params = await off_the_loop([spec], lambda: validate(spec, self.router.tokenizer, self.limits))
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        completion_tokens = 0
        try:
            # aclosing: if grpc is cancelled between our yields, the router still releases the
            # request now (its workers abort and free its blocks), not whenever it is collected.
            generation = self.router.generate(request_id, prompt_ids, params, caller_of(context, self.auth))
            async with contextlib.aclosing(generation) as chunks:
                async for chunk in chunks:
                    completion_tokens += len(chunk.token_ids)
                    response = pb.GenerateResponse(request_id=request_id, token_ids=chunk.token_ids, text=chunk.text,
                                                   step_time=chunk.step_time)  # fmt: skip
                    if chunk.logprobs:
                        response.logprobs.extend(_token_logprobs(lp) for lp in chunk.logprobs)
                    if chunk.prompt_logprobs:
                        *before, last = _pieces(chunk.prompt_logprobs[1:], PROMPT_LOGPROBS_PER_RESPONSE)
                        for piece in before:
                            yield pb.GenerateResponse(request_id=request_id, prompt_logprobs=map(_token_logprobs, piece))
                        response.prompt_logprobs.extend(map(_token_logprobs, last))
                    if chunk.finish_reason:
                        response.finish_reason = chunk.finish_reason
                        response.usage.prompt_tokens = len(prompt_ids)
                        response.usage.completion_tokens = completion_tokens
                        response.timeline.extend(pb.PhaseEvent(name=e.name, seconds=e.seconds, worker=e.worker)
                                                 for e in chunk.timeline)  # fmt: skip
                    yield response
        except RequestError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except Exception as e:  # noqa: BLE001 - a bug (ours or a worker's): say so, and keep serving
            logger.exception("request %s failed", request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e}")

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.router.abort(request.request_id, caller_of(context, self.auth)))

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        m = self.model
        return pb.ModelInfo(model_name=m.name, max_model_len=m.max_model_len, vocab_size=m.vocab_size, block_size=m.block_size)

    async def GetClusterState(self, request, context) -> pb.ClusterState:
        return cluster_state(await self.router.worker_stats(), self.mode, self.transfer, self.router.pools(), self.planner(), self.engine)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, generation: GenerationServicer, scale: Scaler):
        self.generation = generation
        self.scale = scale

    async def Scale(self, request: pb.ScaleRequest, context) -> pb.ClusterState:
        sizes = {k: getattr(request, k) for k in POOLS if request.HasField(k)}
        bounds = {}
        for pool in POOLS:
            low, high = (getattr(request, f"{end}_{pool}") if request.HasField(f"{end}_{pool}") else None for end in ("min", "max"))
            if low is not None or high is not None:
                bounds[pool] = (low, high)
        try:
            await self.scale(sizes, bounds)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:  # a new worker did not start
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return await self.generation.GetClusterState(pb.GetClusterStateRequest(), context)


def cluster_state(workers: list[dict], mode: str, transfer: str, pools: dict[str, dict[str, int]], planner: dict | None = None,
                  engine: str = "") -> pb.ClusterState:  # fmt: skip
    state = pb.ClusterState(mode=mode, transfer=transfer if mode == "disaggregated" else "", engine=engine)
    state.pools.extend(pb.PoolState(name=name, **pool) for name, pool in pools.items())
    if planner is not None:
        p = state.planner
        p.policy, p.interval, p.rounds = planner["policy"], planner["interval"], planner["rounds"]
        p.slo_ttft_ms, p.slo_itl_ms = planner["slo"]["ttft_ms"], planner["slo"]["itl_ms"]
        p.targets.update(planner["targets"])
        for role, (low, high) in planner["bounds"].items():
            p.bounds[role].min, p.bounds[role].max = low, high
        p.decisions.extend(pb.PlannerDecision(**d) for d in planner["decisions"])
    for w in workers:
        kv, prefix = w.get("kv_blocks", {}), w.get("prefix_cache", {})
        state.workers.append(
            pb.WorkerState(
                id=w["id"], role=w["role"], state=w["state"], node=w.get("node", ""), node_id=w.get("node_id", ""),
                node_address=w.get("node_address", ""), pid=w.get("pid", 0),
                running=w.get("running", 0), waiting=w.get("waiting", 0),
                kv_blocks=pb.KvBlocks(**{k: kv.get(k, 0) for k in ("total", "free", "cached", "in_use")}),
                prefix_cache=pb.PrefixCache(**{k: prefix.get(k, 0) for k in ("query_tokens", "hit_tokens")}),
                preemptions=w.get("preemptions", 0), steps=w.get("steps", 0),
                chunked_prefill_steps=w.get("chunked_prefill_steps", 0), queued_tokens=w.get("queued_tokens", 0),
                busy_seconds=w.get("busy_seconds", 0.0), busy_cpu_seconds=w.get("busy_cpu_seconds", 0.0),
            )  # fmt: skip
        )
    return state


class KeyCheck(grpc.aio.ServerInterceptor):
    """Refuses calls to Generation without a valid key and to Admin without an admin key (see
    router.auth); health and reflection stay open."""

    def __init__(self, auth: Auth):
        self.auth = auth

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        service = details.method.split("/")[1] if details.method.count("/") == 2 else ""
        if service not in SERVICES or handler is None:
            return handler
        authorization = dict(details.invocation_metadata or ()).get("authorization")
        if self.auth.caller(authorization) is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required: send 'authorization: Bearer KEY'")
        if service == ADMIN and not self.auth.is_admin(authorization):
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, "this needs an admin key")
        return handler


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """A request whose bytes are not its message gets INVALID_ARGUMENT (grpc itself answers UNKNOWN, as
    for a bug): the handler's parser hands the servicer a marker instead of raising, and the call is refused."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def tolerant(data: bytes):
            try:
                return parse(data)
            except DecodeError as e:
                return _Undecodable(f"the request is not a valid {details.method.split('/')[-1]} message: {e}")

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, tolerant, handler.response_serializer)
        if inspect.isasyncgenfunction(handler.unary_stream):
            inner = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                async with contextlib.aclosing(inner(request, context)) as responses:  # closed with this one: a cancel releases at once
                    async for response in responses:
                        yield response

            return grpc.unary_stream_rpc_method_handler(stream, tolerant, handler.response_serializer)
        return handler


@dataclass(frozen=True)
class _Undecodable:
    reason: str


def _refusal(handler, code: grpc.StatusCode, message: str):
    async def refuse(request, context):
        await context.abort(code, message)

    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(refuse, handler.request_deserializer, handler.response_serializer)


# A stream can carry no data for a minute (waiting for admission, a long prompt prefilling):
# clients that keep their connection alive with pings every 10 s or more are let through (gRPC's
# default refuses pings more often than every 5 minutes without data and closes the connection),
# and the server's own pings find a client that vanished (its stream ends, its KV blocks are freed).
KEEPALIVE = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),  # a client pinging too often is not cut off for it
)
# gRPC sets SO_REUSEPORT by default: a second cluster started on a taken port would bind it too,
# and the kernel would split new connections between the two. Refuse the port instead.
SERVER_OPTIONS = (*KEEPALIVE, ("grpc.so_reuseport", 0))


class Server:
    """The router's gRPC server and its health status."""

    def __init__(self, router: Router, model: ModelInfo, mode: str, transfer: str, scale: Scaler, auth: Auth = Auth(),
                 planner: Callable[[], dict | None] = lambda: None, engine: str = ""):  # fmt: skip
        self.router = router
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(interceptors=[RefuseUndecodable(), KeyCheck(auth)], options=SERVER_OPTIONS)  # the first sees what the second made
        self.generation = GenerationServicer(router, model, mode, transfer, auth)
        self.generation.planner, self.generation.engine = planner, engine
        pb_grpc.add_GenerationServicer_to_server(self.generation, self.server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(self.generation, scale), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0

    async def start(self, host: str, port: int, tls: tuple[bytes, bytes] | None = None) -> int:
        """Listen on host:port (0: any free port); tls = (certificate chain, private key), PEM."""
        address = f"{host}:{port}"
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {host}:{port}")
        await self.update_health()
        await self.server.start()
        return self.port

    async def update_health(self) -> None:
        """The server (and its services): SERVING while every role has a ready worker. Each pool
        (POOL_HEALTH + name): SERVING while it has all the workers asked for ready."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        status = serving if self.router.serving() else not_serving
        for service in ("", *SERVICES):
            await self.health.set(service, status)
        for name, pool in self.router.pools().items():
            await self.health.set(POOL_HEALTH + name, serving if pool["ready"] >= pool["target"] else not_serving)

    async def shut_door(self) -> None:
        """Shutting down: health is NOT_SERVING from now on (the router refuses new requests)."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float = 5.0) -> None:
        await self.shut_door()
        await self.server.stop(grace)

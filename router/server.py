"""The public gRPC server: pdserve.v1.Generation and Admin, grpc.health.v1 health, reflection.

Status codes: INVALID_ARGUMENT (bad input, with the reason), RESOURCE_EXHAUSTED (the cluster
and its waiting queue are full, or no KV room within the admission timeout), UNAVAILABLE (no
ready worker, shutting down, or a request that could not be moved again after its worker died),
DEADLINE_EXCEEDED and CANCELLED (grpc's own, when the client's deadline passes or it cancels),
INTERNAL (a bug: logged).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc
from router.router import RequestError, Router
from router.validation import InvalidRequest, ModelLimits, validate

logger = logging.getLogger(__name__)

SERVICES = ("pdserve.v1.Generation", "pdserve.v1.Admin")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    block_size: int


Scaler = Callable[[dict[str, int]], Awaitable[None]]  # {"prefill": n, "decode": m} -> resized


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, model: ModelInfo, mode: str, transfer: str):
        self.router = router
        self.model = model
        self.limits = ModelLimits(model.max_model_len, model.vocab_size)
        self.mode, self.transfer = mode, transfer

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            prompt_ids, params = validate(request, self.router.tokenizer, self.limits)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        request_id = request.request_id or uuid.uuid4().hex
        completion_tokens = 0
        try:
            # aclosing: if grpc is cancelled between our yields, the router still releases the
            # request now (its workers abort and free its blocks), not whenever it is collected.
            async with contextlib.aclosing(self.router.generate(request_id, prompt_ids, params)) as chunks:
                async for chunk in chunks:
                    completion_tokens += len(chunk.token_ids)
                    response = pb.GenerateResponse(
                        request_id=request_id, token_ids=chunk.token_ids, text=chunk.text, finish_reason=chunk.finish_reason or ""
                    )
                    if chunk.finish_reason:
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
        return pb.AbortResponse(found=self.router.abort(request.request_id))

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        m = self.model
        return pb.ModelInfo(model_name=m.name, max_model_len=m.max_model_len, vocab_size=m.vocab_size, block_size=m.block_size)

    async def GetClusterState(self, request, context) -> pb.ClusterState:
        return cluster_state(await self.router.worker_stats(), self.mode, self.transfer)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, generation: GenerationServicer, scale: Scaler):
        self.generation = generation
        self.scale = scale

    async def Scale(self, request: pb.ScaleRequest, context) -> pb.ClusterState:
        sizes = {k: getattr(request, k) for k in ("prefill", "decode", "colocated") if request.HasField(k)}
        try:
            await self.scale(sizes)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:  # a new worker did not start
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return await self.generation.GetClusterState(pb.GetClusterStateRequest(), context)


def cluster_state(workers: list[dict], mode: str, transfer: str) -> pb.ClusterState:
    state = pb.ClusterState(mode=mode, transfer=transfer if mode == "disaggregated" else "")
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
                chunked_prefill_steps=w.get("chunked_prefill_steps", 0),
            )  # fmt: skip
        )
    return state


class Server:
    """The router's gRPC server and its health status."""

    def __init__(self, router: Router, model: ModelInfo, mode: str, transfer: str, scale: Scaler):
        self.router = router
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        self.generation = GenerationServicer(router, model, mode, transfer)
        pb_grpc.add_GenerationServicer_to_server(self.generation, self.server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(self.generation, scale), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {host}:{port}")
        await self.update_health()
        await self.server.start()
        return self.port

    async def update_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.router.serving() else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", *SERVICES):
            await self.health.set(service, status)

    async def shut_door(self) -> None:
        """Shutting down: health is NOT_SERVING from now on (the router refuses new requests)."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float = 5.0) -> None:
        await self.shut_door()
        await self.server.stop(grace)

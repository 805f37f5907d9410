"""What a simulated cluster is: its pools, each worker's engine options, the router's admission
and the KV transfer backend. Frozen, checked once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

DEFAULT_CHUNK_SIZE = 512  # engine.config's default (engine.config imports torch, so it is not imported here)


@dataclass(frozen=True)
class EngineSpec:
    """A worker's scheduling options, as engine.config.EngineConfig names them (chunked prefill on)."""

    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    chunk_size: int | None = None  # None: min(512, max_num_batched_tokens), as the engine resolves it
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # None: the profile's kv_capacity_tokens / block_size, rounded up (as the engine sizes it)

    def resolve(self, profile) -> "EngineSpec":
        blocks = self.num_kv_blocks
        if blocks is None:
            if not getattr(profile, "kv_capacity_tokens", None):
                raise ValueError("the profile records no KV capacity: give the pool size in blocks (--kv-blocks)")
            blocks = -(-profile.kv_capacity_tokens // self.block_size)
        if blocks < 1 or self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError("KV blocks, block size and max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every running sequence decodes each step)")
        chunk = min(self.chunk_size or DEFAULT_CHUNK_SIZE, self.max_num_batched_tokens)
        return dataclasses.replace(self, chunk_size=chunk, num_kv_blocks=blocks)


@dataclass(frozen=True)
class SimConfig:
    prefill: int = 1
    decode: int = 1
    colocated: int = 0  # > 0: that many workers doing both phases instead of the two pools
    engine: EngineSpec = field(default_factory=EngineSpec)
    transfer: str = "nccl"  # the profile's transfer backend
    admission_timeout: float = 60.0  # a request waiting this long for KV room ends as "timeout"
    max_waiting_requests: int = 256  # the router's admission queue (RouterConfig's default); past it, "rejected"
    startup_seconds: float | None = None  # a new worker's start-up; None: the profile's
    slo_ttft_ms: float = 1000.0
    slo_itl_ms: float = 100.0
    sample_interval: float = 1.0  # the timeline's step
    trace_until: float = 0.0  # record Chrome-trace spans of what starts before this time (0: none)
    # The serving stack's own latency per control message, one way, in seconds (0: not modelled):
    # client_hop between a client and the router (a gRPC call), worker_hop between the router and a
    # worker (a Ray call, a long poll's answer). A request's TTFT and E2E carry two client hops and
    # four worker hops disaggregated (the reservation and its answer, the prefill call, the poll
    # that brings the first token) or two colocated (the submit, the poll); the planner's window,
    # measured at the router, the worker hops. Latency added to each request, not time a worker
    # waits: the steps are as the profile says.
    client_hop: float = 0.0
    worker_hop: float = 0.0

    @property
    def mode(self) -> str:
        return "colocated" if self.colocated else "disaggregated"

    @property
    def worker_hops(self) -> float:
        """The router-side share of a request's control-message latency (seconds)."""
        return (2 if self.colocated else 4) * self.worker_hop

    @property
    def hops(self) -> float:
        """All of a request's control-message latency, client to client (seconds)."""
        return 2 * self.client_hop + self.worker_hops

    @property
    def pools(self) -> dict[str, int]:
        return {"colocated": self.colocated} if self.colocated else {"prefill": self.prefill, "decode": self.decode}

    def check(self) -> "SimConfig":
        if min(self.prefill, self.decode, self.colocated) < 0:
            raise ValueError("pool sizes cannot be negative")
        if not self.colocated and (self.prefill < 1 or self.decode < 1):
            raise ValueError("disaggregated mode needs at least one prefill and one decode worker (or colocated N)")
        if self.admission_timeout <= 0 or self.sample_interval <= 0:
            raise ValueError("admission_timeout and sample_interval must be positive")
        if self.max_waiting_requests < 0:
            raise ValueError("max_waiting_requests cannot be negative")
        if min(self.client_hop, self.worker_hop) < 0:
            raise ValueError("hop latencies cannot be negative")
        return self

"""How a cluster is laid out: pools, transfer backend, where it listens, who may call. Checked
once, at build time."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from cluster.planner import PlannerConfig
from engine.config import EngineConfig
from kv_transfer import BACKENDS
from router.auth import Auth
from router.router import RouterConfig

# What "auto" picks: the faster backend, on either hardware. Measured with `pdserve bench
# kv-transfer` (benchmarks/RESULTS.md): between CPU processes gloo (our "nccl" backend on CPU)
# moves KV as fast as gRPC or faster from ~1k tokens up (1.3-1.5 vs ~1.05 GB/s at 4k tokens);
# between GPUs NCCL is the one that uses NVLink/RDMA.
AUTO_TRANSFER = "nccl"


def gpu_share(gpus: float, workers: int, transfer: str) -> tuple[float, str]:
    """GPUs per worker and the KV transfer backend when the user left --gpus-per-worker to us and
    the cluster is this machine: a GPU each where there are enough, else an equal share (two
    decimals, rounded down, so the shares fit), and then gRPC, since NCCL pairs distinct GPUs."""
    if gpus <= 0 or gpus >= workers:
        return 1.0, transfer
    return math.floor(gpus / workers * 100) / 100, "grpc"


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)  # every worker's engine
    prefill: int = 1
    decode: int = 1
    colocated: int = 0  # > 0: that many workers doing both phases, instead of the two pools
    transfer: str = "auto"  # "nccl", "grpc" or "auto" (the faster one for this hardware)
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = None  # the OpenAI-compatible HTTP API on this port (0: any free one); None: off
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: any free one); None: off
    served_model_name: str | None = None  # the model's name in the APIs; None: the model folder's name
    allowed_origins: tuple[str, ...] = ()  # the HTTP API's CORS origins ("*": any); none: browsers' cross-origin calls refused
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # any of them lets a caller in; none: open
    admin_keys: tuple[str, ...] = field(default=(), repr=False)  # for the Admin service (and everything else)
    tls_cert: str | None = None  # PEM certificate chain and key: TLS on the gRPC and HTTP ports
    tls_key: str | None = None
    # Bounds on the pool sizes a Scale (or the planner) may ask for.
    max_prefill: int = 16
    max_decode: int = 16
    max_colocated: int = 16
    address: str | None = None  # a Ray cluster to join; None starts a local Ray
    # Ray's autoscaler launches the nodes (a `ray up` cluster, which starts with the head alone):
    # every worker asks for its pool's resource and its GPUs even when no live node offers them,
    # so that Ray launches a node that does. Otherwise only what a live node offers is asked for.
    nodes_on_demand: bool = False
    threads_per_worker: int | None = None  # torch threads; None = this machine's cores / workers (CPU)
    # Where the cluster has GPUs; a fraction packs workers onto one (not with NCCL transfer). None: a GPU
    # each, or on a local Ray with fewer GPUs than workers an equal share of them (see gpu_share).
    gpus_per_worker: float | None = None
    transfer_timeout: float = 60.0
    startup_timeout: float = 600.0  # a worker loading its model (the first start converts the GGUF)
    drain_timeout: float = 600.0  # a removed worker finishing its requests
    shutdown_grace: float = 30.0  # stopping: requests in flight finish within this, then workers stop
    router: RouterConfig = field(default_factory=RouterConfig)
    autoscale: PlannerConfig | None = None  # the planner sizes the pools, within its bounds (and the max_* above)
    planner_profile: str | None = None  # cost profile of the predictive policy (default: the mock engine's)

    @property
    def mode(self) -> str:
        return "colocated" if self.colocated else "disaggregated"

    def resolve(self) -> "ServeConfig":
        if self.colocated < 0 or self.prefill < 0 or self.decode < 0:
            raise ValueError("pool sizes cannot be negative")
        if not self.colocated and (self.prefill < 1 or self.decode < 1):
            raise ValueError("disaggregated mode needs at least one prefill and one decode worker (or use --colocated N)")
        transfer = AUTO_TRANSFER if self.transfer == "auto" else self.transfer
        if transfer not in BACKENDS:
            raise ValueError(f"--transfer must be one of {BACKENDS} or auto, got {transfer!r}")
        for name in ("port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port < 65536:
                raise ValueError(f"{name} must be in [0, 65535], got {port}")
        for pool, bound in self.pool_bounds.items():
            if bound < 1:
                raise ValueError(f"--max-{pool} must be >= 1, got {bound}")
            if getattr(self, pool) > bound:
                raise ValueError(f"{getattr(self, pool)} {pool} workers asked for, beyond --max-{pool} {bound}")
        if self.nodes_on_demand and not self.address:
            raise ValueError("--nodes-on-demand needs --address: a local Ray launches no nodes")
        if self.gpus_per_worker is not None and not 0 < self.gpus_per_worker <= 8:
            raise ValueError(f"--gpus-per-worker must be in (0, 8], got {self.gpus_per_worker}")
        if self.autoscale is not None:
            for pool in ("colocated",) if self.colocated else ("prefill", "decode"):
                low, high = self.autoscale.bounds(pool)
                if high > self.pool_bounds[pool]:
                    raise ValueError(f"the planner's --max-{pool} {high} is beyond the cluster's bound {self.pool_bounds[pool]}")
                if not low <= getattr(self, pool) <= high:
                    raise ValueError(f"{getattr(self, pool)} {pool} workers to start with, outside the planner's bounds [{low}, {high}]")
            if self.autoscale.policy == "predictive" and self.planner_profile is None and self.engine.mock_profile is None:
                raise ValueError("the predictive policy needs a cost profile: --profile (pdserve profile writes one)")
        Auth.from_keys(self.api_keys, self.admin_keys)  # raises on a malformed key
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"cannot read {path}")
        return dataclasses.replace(
            self, transfer=transfer, router=dataclasses.replace(self.router, mode=self.mode)
        )

    @property
    def pool_bounds(self) -> dict[str, int]:
        return {"prefill": self.max_prefill, "decode": self.max_decode, "colocated": self.max_colocated}

    @property
    def tls(self) -> tuple[str, str] | None:
        """(certificate file, key file), if TLS is on."""
        return (self.tls_cert, self.tls_key) if self.tls_cert else None

    @property
    def num_workers(self) -> int:
        return self.colocated or self.prefill + self.decode

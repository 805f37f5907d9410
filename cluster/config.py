"""How a cluster is laid out: pools, transfer backend, where it listens. Checked once, at build time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.config import EngineConfig
from kv_transfer import BACKENDS
from router.router import RouterConfig

# What "auto" picks: the faster backend, on either hardware. Measured with `pdserve bench
# kv-transfer` (benchmarks/RESULTS.md): between CPU processes gloo (our "nccl" backend on CPU)
# moves KV as fast as gRPC or faster from ~1k tokens up (1.3-1.5 vs ~1.05 GB/s at 4k tokens);
# between GPUs NCCL is the one that uses NVLink/RDMA.
AUTO_TRANSFER = "nccl"


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)  # every worker's engine
    prefill: int = 1
    decode: int = 1
    colocated: int = 0  # > 0: that many workers doing both phases, instead of the two pools
    transfer: str = "auto"  # "nccl", "grpc" or "auto" (the faster one for this hardware)
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: any free one); None: off
    address: str | None = None  # a Ray cluster to join; None starts a local Ray
    threads_per_worker: int | None = None  # torch threads; None = this machine's cores / workers (CPU)
    transfer_timeout: float = 60.0
    startup_timeout: float = 600.0  # a worker loading its model (the first start converts the GGUF)
    drain_timeout: float = 600.0  # a removed worker finishing its requests
    shutdown_grace: float = 30.0  # stopping: requests in flight finish within this, then workers stop
    router: RouterConfig = field(default_factory=RouterConfig)

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
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        return dataclasses.replace(
            self, transfer=transfer, router=dataclasses.replace(self.router, mode=self.mode)
        )

    @property
    def num_workers(self) -> int:
        return self.colocated or self.prefill + self.decode

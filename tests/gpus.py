"""Test clusters on this machine's GPUs: placement options so that all of a test cluster's workers
fit. Without GPUs they change nothing. With GPUs each worker gets a share of them; KV transfer
over NCCL needs a GPU of its own per worker (NCCL will not pair two processes on one GPU), so a
test that asks for "nccl" on too few GPUs is skipped, saying so, and "auto" takes grpc there."""

import math

import pytest
import torch

CLUSTERS_AT_ONCE = 3


def placement(workers: int, transfer: str = "auto") -> dict:
    """ServeConfig options (`transfer`, `gpus_per_worker`) for a cluster of up to `workers` workers."""
    gpus = torch.cuda.device_count()
    if not gpus:
        return {"transfer": transfer}
    if transfer in ("nccl", "auto") and gpus >= workers:
        return {"transfer": transfer, "gpus_per_worker": 1.0}
    if transfer == "nccl":
        pytest.skip(f"{workers} workers with NCCL KV transfer need a GPU each (NCCL pairs distinct GPUs); this machine has {gpus}")
    # A test module keeps up to CLUSTERS_AT_ONCE clusters alive (module fixtures): each takes its share.
    return {"transfer": "grpc", "gpus_per_worker": math.floor(gpus / (workers * CLUSTERS_AT_ONCE) * 100) / 100}

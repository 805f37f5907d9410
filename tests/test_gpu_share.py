"""Workers on fewer GPUs than workers: the placement rule and the KV budget each worker keeps to.
Pure functions, so they are checked here on any machine (the CUDA path that calls them ran on a
GPU in `make gpu-check`'s cluster tests)."""

from pathlib import Path

import pytest

from cluster.config import ServeConfig, gpu_share
from engine.config import EngineConfig
from engine.kv_cache import shared_device_budget
from engine.llm_engine import load_model_config


@pytest.mark.parametrize(
    "gpus, workers, transfer, expected",
    [
        (0, 2, "nccl", (1.0, "nccl")),  # no GPU: nothing to share
        (2, 2, "nccl", (1.0, "nccl")),  # a GPU each
        (8, 3, "grpc", (1.0, "grpc")),
        (1, 2, "nccl", (0.5, "grpc")),  # 1P + 1D on one GPU: halves, and NCCL cannot pair them
        (1, 3, "nccl", (0.33, "grpc")),  # rounded down, so three shares fit in the one GPU
        (2, 3, "grpc", (0.66, "grpc")),
    ],
)  # fmt: skip
def test_workers_share_the_gpus_equally_and_move_kv_over_grpc_when_there_are_too_few(gpus, workers, transfer, expected):
    share, backend = gpu_share(gpus, workers, transfer)
    assert (share, backend) == expected
    assert share * workers <= max(gpus, workers)


def test_gpus_per_worker_left_unset_is_settled_at_start_and_a_given_one_is_checked():
    assert ServeConfig().resolve().gpus_per_worker is None
    assert ServeConfig(gpus_per_worker=0.5, transfer="grpc").resolve().gpus_per_worker == 0.5
    with pytest.raises(ValueError, match="gpus-per-worker"):
        ServeConfig(gpus_per_worker=0).resolve()


def test_an_engine_sharing_its_gpu_keeps_its_kv_to_its_share_less_its_weights(tiny_model):
    gib = 2**30
    # Two engines on an 80 GiB card start together; each sees 78 GiB free and holds 2 GiB of weights.
    budget = shared_device_budget(int(78 * gib * 0.9), 80 * gib, 2 * gib, 0.9, 0.5)
    assert budget == int(80 * gib * 0.5 * 0.9) - 2 * gib  # 34 GiB, not 70
    assert 2 * (budget + 2 * gib) <= 80 * gib * 0.9  # both together stay within the card
    # Little free memory left: the free-memory budget is the smaller one and wins.
    assert shared_device_budget(gib, 80 * gib, 2 * gib, 0.9, 0.5) == gib
    with pytest.raises(ValueError, match="device_share"):
        EngineConfig(model=tiny_model, device_share=0).resolve(load_model_config(Path(tiny_model)))

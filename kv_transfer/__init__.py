"""Moving KV blocks from a prefill worker's pool into a decode worker's pool.

Two backends behind one sender/receiver interface (kv_transfer.base), chosen by name:
  "nccl"  torch.distributed point-to-point (NCCL between GPUs, gloo on CPU: the same code)
  "grpc"  a long-lived KvTransfer.Transfer stream per prefill -> decode pair
See kv_transfer.base for who owns which blocks during a transfer, kv_transfer.wire for what
travels. No Ray here: the workers wire senders and receivers together.
"""

from __future__ import annotations

import torch

from kv_transfer.base import CompletionCallback, Destination, KVReceiver, KVSender, OutgoingTransfer
from kv_transfer.wire import ChunkMeta, KVLayout, TransferError

BACKENDS = ("nccl", "grpc")


def make_sender(backend: str, kv: torch.Tensor, timeout: float = 30.0) -> KVSender:
    if backend == "grpc":
        from kv_transfer.grpc_backend import GrpcSender

        return GrpcSender(kv, timeout)
    if backend == "nccl":
        from kv_transfer.torch_backend import TorchDistSender

        return TorchDistSender(kv, timeout)
    raise ValueError(f"unknown KV transfer backend {backend!r}; choose from {BACKENDS}")


def make_receiver(backend: str, kv: torch.Tensor, on_complete: CompletionCallback, host: str = "127.0.0.1", timeout: float = 30.0) -> KVReceiver:
    if backend == "grpc":
        from kv_transfer.grpc_backend import GrpcReceiver

        return GrpcReceiver(kv, on_complete, host)
    if backend == "nccl":
        from kv_transfer.torch_backend import TorchDistReceiver

        return TorchDistReceiver(kv, on_complete, host, timeout)
    raise ValueError(f"unknown KV transfer backend {backend!r}; choose from {BACKENDS}")


__all__ = [
    "BACKENDS", "ChunkMeta", "CompletionCallback", "Destination", "KVLayout", "KVReceiver", "KVSender",
    "OutgoingTransfer", "TransferError", "make_receiver", "make_sender",
]  # fmt: skip

"""Moving KV blocks from a prefill worker's pool into a decode worker's pool.

Two backends behind one sender/receiver interface (kv_transfer.base), chosen by name:
  "nccl"  torch.distributed point-to-point (NCCL between GPUs, gloo on CPU: the same code)
  "grpc"  a long-lived KvTransfer.Transfer stream per prefill -> decode pair
See kv_transfer.base for who owns which blocks during a transfer, kv_transfer.wire for what
travels, kv_transfer.auth for how every connection proves the cluster's secret. No Ray here:
the workers wire senders and receivers together.
"""

from __future__ import annotations

import torch

from kv_transfer.auth import check_secret, new_secret
from kv_transfer.base import CompletionCallback, Destination, KVReceiver, KVSender, OutgoingTransfer
from kv_transfer.wire import REASONS, ChunkMeta, KVLayout, TransferError

BACKENDS = ("nccl", "grpc")


def make_sender(backend: str, kv: torch.Tensor, secret: bytes, timeout: float = 30.0) -> KVSender:
    """The prefill side; `secret` is the cluster's (kv_transfer.auth), which every receiver checks."""
    check_secret(secret)
    if backend == "grpc":
        from kv_transfer.grpc_backend import GrpcSender

        return GrpcSender(kv, secret, timeout)
    if backend == "nccl":
        from kv_transfer.torch_backend import TorchDistSender

        return TorchDistSender(kv, secret, timeout)
    raise ValueError(f"unknown KV transfer backend {backend!r}; choose from {BACKENDS}")


def make_receiver(backend: str, kv: torch.Tensor, on_complete: CompletionCallback, secret: bytes, host: str = "127.0.0.1",
                  timeout: float = 30.0) -> KVReceiver:  # fmt: skip
    """The decode side, listening on `host` only (the address it advertises)."""
    check_secret(secret)
    if backend == "grpc":
        from kv_transfer.grpc_backend import GrpcReceiver

        return GrpcReceiver(kv, on_complete, secret, host)
    if backend == "nccl":
        from kv_transfer.torch_backend import TorchDistReceiver

        return TorchDistReceiver(kv, on_complete, secret, host, timeout)
    raise ValueError(f"unknown KV transfer backend {backend!r}; choose from {BACKENDS}")


__all__ = [
    "BACKENDS", "REASONS", "ChunkMeta", "CompletionCallback", "Destination", "KVLayout", "KVReceiver", "KVSender",
    "OutgoingTransfer", "TransferError", "make_receiver", "make_sender", "new_secret",
]  # fmt: skip

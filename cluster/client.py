"""How the CLI and the benchmarks reach a cluster's gRPC API: TLS when given a CA certificate,
the API key as `authorization: Bearer KEY` metadata on every call."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"


def add_client_args(parser: argparse.ArgumentParser, key_env: str = "PDSERVE_API_KEY") -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help="the router's gRPC address")
    parser.add_argument("--api-key", default=env_key(key_env), help=f"sent as 'authorization: Bearer KEY' (default: ${key_env})")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to verify the server with: connects over TLS")


def env_key(name: str = "PDSERVE_API_KEY") -> str | None:
    """The first key of a comma-separated key variable, if set."""
    return os.environ.get(name, "").split(",")[0].strip() or None


def channel(target: str, tls_ca: str | None = None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))


def aio_channel(target: str, tls_ca: str | None = None) -> grpc.aio.Channel:
    if tls_ca is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()

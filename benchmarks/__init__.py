"""The `pdserve bench` commands; each prints a table and can write JSON (and some a plot)."""

import contextlib
import json
import socket


def save_json(path: str | None, result: dict) -> None:
    """Write a benchmark's result to `path`, when one was given, stamped with the commit and machine it came from."""
    if path:
        from benchmarks.provenance import provenance

        with open(path, "w") as f:
            json.dump({**result, "provenance": provenance()}, f, indent=2)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server the caller starts there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_cluster_args(parser, transfer: bool = True) -> None:
    """The flags of a bench that starts a cluster of its own (overload, soak, worker-death: that one
    takes several transfer backends, its own --transfer)."""
    if transfer:
        parser.add_argument("--transfer", default="auto")
    parser.add_argument("--model")
    parser.add_argument("--kv-cache-gb", type=float, default=0.25)
    parser.add_argument("--address", help="run on this Ray cluster instead of a local one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the result here")


@contextlib.contextmanager
def bench_ray(address: str | None):
    """Ray for a bench that starts a cluster of its own: the one this process already has (a
    test's), or one started here, local with both pools' resources or the cluster at `address`,
    and shut down on the way out."""
    import ray

    from cluster.cluster import LOCAL_POOL_RESOURCES

    if ray.is_initialized():
        yield
        return
    ray.init(address=address or "local", resources=None if address else LOCAL_POOL_RESOURCES, include_dashboard=False, namespace="pdserve")
    try:
        yield
    finally:
        ray.shutdown()

"""KV-transfer latency and bandwidth, per backend and size, against the ceilings of the same run.

    pdserve bench kv-transfer [--backends nccl grpc] [--tokens 16 64 256 1024 4096] [--json F] [--plot F.png]
                              [--address RAY --sender-resource prefill --receiver-resource decode] [--device cuda]

A sender and a receiver run as two Ray actors: two processes on one machine (a local Ray), or
two nodes of a cluster (--address, placed by custom resources). Each holds a KV pool laid out
like the default model's (or --layers/--kv-heads/--head-dim/--dtype). For every size it times
complete transfers (first chunk to the receiver's acknowledgement) and reports p50/p90/p99,
effective GB/s (10^9 bytes/s), and the fixed cost per transfer: the p50 latency of a one-block
transfer of a 2 KB layout on the warm channel. With --device cuda the pools are on GPUs (one
per actor where the cluster has two or more, else both share one: then NCCL cannot pair them).

Ceilings, measured between the same two processes in the same run: raw TCP throughput over
one socket, and memcpy bandwidth (on the pools' device). Every figure is printed with its ratio to its ceiling.

Layer-wise pipelining: a real prefill of --pipeline-tokens on the default model, with each
layer group shipped as soon as it is computed (on) or everything after the forward (off);
the figure is how much transfer time is still exposed after the prefill ends.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import numpy as np
import ray
import torch

from benchmarks import save_json
from kv_transfer import Destination, make_receiver, make_sender, new_secret

GB = 1e9


def _layout_pool(layers: int, heads: int, head_dim: int, block_size: int, blocks: int, dtype: str, device: str = "cpu") -> torch.Tensor:
    return torch.randn(layers, 2, blocks, block_size, heads, head_dim, device=device).to(getattr(torch, dtype))


TINY = dict(layers=1, heads=1, head_dim=16, block_size=16, dtype="float32")  # 2 KB blocks: fixed cost only


class BenchReceiver:
    """The decode side: pools (the measured layout, and TINY), a receiver per backend and pool,
    and a raw TCP sink for the socket ceiling."""

    def __init__(self, layout: dict, blocks: int, local: bool, secret: bytes, device: str = "cpu"):
        self.secret = secret
        self.pools = {"main": torch.zeros_like(_layout_pool(**layout, blocks=blocks, device=device)),
                      "tiny": torch.zeros_like(_layout_pool(**TINY, blocks=4, device=device))}  # fmt: skip
        # On one machine everything stays on loopback; across nodes, the node's own address.
        self.host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        self.receivers = {}

    def address(self) -> str:
        return self.host

    def open(self, backend: str, pool: str) -> str:
        receiver = make_receiver(backend, self.pools[pool], self._complete, self.secret, self.host, timeout=120)
        self.receivers[backend, pool] = receiver
        return receiver.address

    def expect(self, backend: str, pool: str, request_id: str, block_ids: list[int]) -> None:
        self.receivers[backend, pool].expect(request_id, block_ids)

    def _complete(self, request_id, first_token, error, first_logprobs):
        if error:
            print(f"transfer {request_id} failed: {error}", flush=True)

    def socket_sink(self) -> int:
        """Accept one connection and read until it closes; returns the port to connect to."""
        server = socket.create_server((self.host, 0))

        def drain():
            conn, _ = server.accept()
            buf = bytearray(8 << 20)
            view = memoryview(buf)
            while conn.recv_into(view):
                pass
            conn.close()
            server.close()

        threading.Thread(target=drain, daemon=True).start()
        return server.getsockname()[1]

    def close(self) -> None:
        for r in self.receivers.values():
            r.close()


class BenchSender:
    def __init__(self, layout: dict, blocks: int, secret: bytes, device: str = "cpu"):
        self.secret, self.device = secret, torch.device(device)
        self.pools = {"main": _layout_pool(**layout, blocks=blocks, device=device), "tiny": _layout_pool(**TINY, blocks=4, device=device)}
        self.senders = {}

    def memcpy_gbps(self, nbytes: int = 256 << 20) -> float:
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        return nbytes / best / GB

    def socket_gbps(self, host: str, port: int, nbytes: int = 2 << 30) -> float:
        payload = memoryview(bytearray(8 << 20))
        with socket.create_connection((host, port)) as conn:
            start = time.perf_counter()
            sent = 0
            while sent < nbytes:
                conn.sendall(payload)
                sent += len(payload)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # returns when the receiver has read everything and closed
            return sent / (time.perf_counter() - start) / GB

    def time_transfers(self, backend: str, pool: str, address: str, receiver, tokens: int, repeats: int) -> list[float]:
        """Seconds per complete transfer (start to acknowledgement) of `tokens` tokens of KV."""
        kv = self.pools[pool]
        key = (backend, pool)
        if key not in self.senders:
            self.senders[key] = make_sender(backend, kv, self.secret, timeout=120)
        sender = self.senders[key]
        num_blocks = -(-tokens // kv.shape[3])
        src = list(range(num_blocks))
        dst = list(range(kv.shape[2] - num_blocks, kv.shape[2]))
        times = []
        for i in range(repeats + 1):  # the first one warms the connection up
            request_id = f"{backend}-{pool}-{tokens}-{i}"
            ray.get(receiver.expect.remote(backend, pool, request_id, dst))
            start = time.perf_counter()
            transfer = sender.start(Destination(address, request_id, tuple(dst)), src)
            transfer.finish(1).result(timeout=120)
            if i:
                times.append(time.perf_counter() - start)
        return times

    def pipelining(self, backend: str, address: str, receiver, tokens: int, model: str | None) -> dict:
        """A real prefill; transfer time still exposed after the forward ends, pipelined or not."""
        from engine.config import EngineConfig
        from engine.llm_engine import LLMEngine
        from engine.sampling_params import SamplingParams

        # One forward for the whole prompt (chunk = prompt): that forward is what the layer-wise
        # sends overlap with. Its KV lives on the device and in the dtype of the bench's pools, which
        # the receiver's match (not the engine's defaults: bfloat16 on a GPU, which the receiver would refuse).
        pool = self.pools["main"]
        engine = LLMEngine(EngineConfig(model=model, device=pool.device.type, dtype=str(pool.dtype).removeprefix("torch."),
                                        detokenize=False, max_model_len=tokens + 16, num_kv_blocks=-(-tokens // 16) + 2,
                                        max_num_batched_tokens=max(2048, tokens), chunk_size=tokens,
                                        enable_prefix_caching=False))  # fmt: skip
        sender = make_sender(backend, engine.kv_cache.kv, self.secret, timeout=120)
        num_blocks = -(-tokens // engine.config.block_size)
        dst = list(range(num_blocks))
        result = {}
        for mode in ("off", "on", "off", "on"):  # alternate, keep the second of each
            request_id = f"pipe-{backend}-{mode}-{time.perf_counter_ns()}"
            ray.get(receiver.expect.remote(backend, "main", request_id, dst))
            prompt = [100 + i % (engine.model_config.vocab_size - 100) for i in range(tokens)]  # any model's vocabulary
            engine.add_request(request_id, prompt, SamplingParams(max_tokens=1), prefill_only=True)
            transfer = None

            def on_layer(layer, completing, request_id=request_id):
                nonlocal transfer
                if transfer is None:
                    transfer = sender.start(Destination(address, request_id, tuple(dst)), completing[0][1])
                transfer.layers_done(layer + 1)

            start = time.perf_counter()
            outputs = []
            while not outputs:  # one step unless the engine's budget still splits the prompt
                outputs = engine.step(on_layer if mode == "on" else None)
            forward_end = time.perf_counter()
            if transfer is None:
                transfer = sender.start(Destination(address, request_id, tuple(dst)), outputs[0].block_ids)
            transfer.finish(1).result(timeout=120)
            done = time.perf_counter()
            engine.release(request_id)
            result[mode] = {"prefill_ms": (forward_end - start) * 1e3, "exposed_ms": (done - forward_end) * 1e3}
        sender.close()
        return {"tokens": tokens, **result}

    def close(self) -> None:
        for s in self.senders.values():
            s.close()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve bench kv-transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--backends", nargs="+", default=["nccl", "grpc"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 64, 256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=20, help="transfers per size (fewer for the big ones)")
    parser.add_argument("--fixed-cost-repeats", type=int, default=200, help="tiny transfers timed for the fixed cost")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--pipeline-tokens", type=int, default=1024, help="0 skips the pipelining experiment")
    parser.add_argument("--model", help="model for the pipelining prefill (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--address", help="a Ray cluster; default: a local Ray (two processes on this machine)")
    parser.add_argument("--sender-resource", help="custom resource placing the sender (e.g. prefill)")
    parser.add_argument("--receiver-resource", help="custom resource placing the receiver (e.g. decode)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both KV pools live")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--plot", help="write a latency-vs-size PNG here")
    args = parser.parse_args(argv)

    layout = dict(layers=args.layers, heads=args.kv_heads, head_dim=args.head_dim, block_size=args.block_size, dtype=args.dtype)
    blocks = 2 * -(-max(args.tokens) // args.block_size)
    ray.init(address=args.address or "local", include_dashboard=False)
    gpus = 0 if args.device == "cpu" else (1 if ray.cluster_resources().get("GPU", 0) >= 2 else 0.5)
    place = lambda r: {"num_cpus": 0, "num_gpus": gpus, **({"resources": {r: 1}} if r else {})}  # noqa: E731
    secret = new_secret()  # as a cluster's workers share one
    receiver = ray.remote(BenchReceiver).options(**place(args.receiver_resource)).remote(layout, blocks, not args.address, secret,
                                                                                         args.device)  # fmt: skip
    sender = ray.remote(BenchSender).options(**place(args.sender_resource)).remote(layout, blocks, secret, args.device)
    receiver_host = ray.get(receiver.address.remote())

    port = ray.get(receiver.socket_sink.remote())
    ceilings = {
        "socket_gbps": ray.get(sender.socket_gbps.remote(receiver_host, port)),
        "memcpy_gbps": ray.get(sender.memcpy_gbps.remote()),
    }
    results, fixed, pipelining = [], {}, {}
    per_block = 2 * args.block_size * args.kv_heads * args.head_dim * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    for backend in args.backends:
        address = ray.get(receiver.open.remote(backend, "main"))
        for tokens in args.tokens:
            nbytes = args.layers * per_block * -(-tokens // args.block_size)
            repeats = max(3, min(args.repeats, int(args.repeats * (64 << 20) / nbytes)))
            times = ray.get(sender.time_transfers.remote(backend, "main", address, receiver, tokens, repeats))
            ms = [t * 1e3 for t in times]
            results.append({
                "backend": backend, "bytes": nbytes, "tokens": tokens,
                "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
                "gbps": nbytes / statistics.median(times) / GB,
            })  # fmt: skip
        # Fixed cost: a one-block transfer of a 2 KB layout on the warm channel, where bandwidth is nil.
        tiny_address = ray.get(receiver.open.remote(backend, "tiny"))
        tiny = ray.get(sender.time_transfers.remote(backend, "tiny", tiny_address, receiver, 16, args.fixed_cost_repeats))
        fixed[backend] = percentile([t * 1e3 for t in tiny], 50)
        if args.pipeline_tokens:
            pipelining[backend] = ray.get(sender.pipelining.remote(backend, address, receiver, args.pipeline_tokens, args.model))
    ray.get([sender.close.remote(), receiver.close.remote()])
    report = {"ceilings": ceilings, "results": results, "fixed_cost_ms": fixed, "pipelining": pipelining,
              "layout": layout, "address": args.address or "local", "device": args.device}  # fmt: skip
    _print(report)
    save_json(args.json, report)
    if args.plot:
        plot(report, args.plot)
    ray.shutdown()
    return report


def _print(r: dict) -> None:
    c = r["ceilings"]
    print(f"\nceilings: raw TCP {c['socket_gbps']:.2f} GB/s between the two processes, memcpy {c['memcpy_gbps']:.2f} GB/s")
    print(f"{'backend':<8}{'tokens':>7}{'MB':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'GB/s':>8}{'/socket':>9}{'/memcpy':>9}")
    for x in r["results"]:
        print(f"{x['backend']:<8}{x['tokens']:>7}{x['bytes'] / 1e6:>9.2f}{x['p50_ms']:>9.2f}{x['p90_ms']:>9.2f}{x['p99_ms']:>9.2f}"
              f"{x['gbps']:>8.2f}{x['gbps'] / c['socket_gbps']:>9.0%}{x['gbps'] / c['memcpy_gbps']:>9.0%}")  # fmt: skip
    for backend, ms in r["fixed_cost_ms"].items():
        print(f"fixed cost per transfer ({backend}, warm channel, 2 KB): {ms:.2f} ms p50")
    for backend, p in r["pipelining"].items():
        print(f"layer-wise pipelining ({backend}, {p['tokens']}-token prefill): exposed after the prefill "
              f"{p['off']['exposed_ms']:.1f} ms off -> {p['on']['exposed_ms']:.1f} ms on "
              f"(prefill {p['on']['prefill_ms']:.0f} ms)")  # fmt: skip


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend in dict.fromkeys(x["backend"] for x in report["results"]):
        rows = [x for x in report["results"] if x["backend"] == backend]
        mb = [x["bytes"] / 1e6 for x in rows]
        ax.plot(mb, [x["p50_ms"] for x in rows], marker="o", label=f"{backend} p50")
        ax.fill_between(mb, [x["p50_ms"] for x in rows], [x["p99_ms"] for x in rows], alpha=0.2)
    mb = sorted({x["bytes"] / 1e6 for x in report["results"]})
    ax.plot(mb, [m / report["ceilings"]["socket_gbps"] for m in mb], "k--", label="raw TCP ceiling")  # MB / (GB/s) = ms
    ax.set(xscale="log", yscale="log", xlabel="KV bytes per transfer (MB)", ylabel="latency (ms)",
           title="KV transfer latency (p50, band to p99)")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

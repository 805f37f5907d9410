"""Overload: bursts of requests far beyond what the cluster holds, against the same cluster at its
capacity.

    pdserve bench overload [--max-num-seqs 8] [--max-waiting-requests 8] [--overload 10] [--rounds 3]
                           [--input-len 64] [--output-len 32] [--transfer auto] [--json F]

A cluster of 1 prefill + 1 decode worker (started here, on a local Ray unless --address) holds
--max-num-seqs requests at once (its capacity) and lets --max-waiting-requests more wait. First
the baseline: a burst of exactly `capacity` requests. Then --rounds bursts of --overload x
capacity simultaneous requests. Reported: how many were served and how many refused
(RESOURCE_EXHAUSTED), how fast the refusals came (goal: within 100 ms; its floor, measured in the
same run, is the same burst of requests the server refuses as INVALID_ARGUMENT before they reach
the router: gRPC's own cost), the served requests' TTFT and E2E latency against the baseline's (the ones admitted at once should keep it; those
that waited in the queue pay the wait), any request neither served nor refused (goal: none),
and this process's RSS (the router runs here; the clients run in a process of their own) across
the rounds (goal: flat).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from benchmarks import add_cluster_args, bench_ray, save_json
from benchmarks.serve import Endpoint, RequestOutput, SampleRequest, run_load, sample_random

MS = 1000.0


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class RssSampler:
    """This process's peak RSS while a block runs, sampled every 50 ms."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self):
        self.peak = rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def send_burst(target: str, requests: list, seed: int) -> list[RequestOutput]:
    """In the clients' process: every request at once."""
    outputs, _ = asyncio.run(run_load(Endpoint("grpc", target), requests, float("inf"), 1.0, None, 0.0, True, seed, progress=False))
    return outputs


def reserved_after(output: RequestOutput) -> float:
    """Seconds from arrival to the router's reservation for the request (its timeline's `reserved`)."""
    return next((e["seconds"] for e in output.timeline if e["name"] == "reserved"), float("inf"))


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.array(values) * MS, p)) if values else 0.0


def summarize(outputs: list[RequestOutput], rss: float) -> dict:
    served = [o for o in outputs if o.success]
    refused = [o for o in outputs if o.code == "RESOURCE_EXHAUSTED"]
    return {
        "sent": len(outputs), "served": len(served), "refused": len(refused),
        "lost": len(outputs) - len(served) - len(refused),  # neither served nor refused: other errors
        "other_errors": sorted({o.error for o in outputs if not o.success and o.code != "RESOURCE_EXHAUSTED"}),
        "refusal_p50_ms": pct([o.latency for o in refused], 50), "refusal_p99_ms": pct([o.latency for o in refused], 99),
        "refusal_max_ms": max((o.latency * MS for o in refused), default=0.0),
        "ttft_p50_ms": pct([o.ttft for o in served], 50), "ttft_p99_ms": pct([o.ttft for o in served], 99),
        "e2el_p50_ms": pct([o.latency for o in served], 50), "e2el_p99_ms": pct([o.latency for o in served], 99),
        "rss_peak_mib": rss,
    }  # fmt: skip


def main(argv=None) -> dict:
    from cluster.cluster import Cluster
    from cluster.config import ServeConfig
    from engine.config import EngineConfig
    from router.router import RouterConfig

    parser = argparse.ArgumentParser(prog="pdserve bench overload", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-num-seqs", type=int, default=8, help="the decode worker's capacity")
    parser.add_argument("--max-waiting-requests", type=int, default=8)
    parser.add_argument("--overload", type=float, default=10.0, help="burst size, in multiples of the capacity")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    add_cluster_args(parser)
    args = parser.parse_args(argv)

    engine = EngineConfig(model=args.model, kv_cache_gb=args.kv_cache_gb, max_model_len=1024, max_num_seqs=args.max_num_seqs)
    router = RouterConfig(max_waiting_requests=args.max_waiting_requests)
    config = ServeConfig(engine=engine, prefill=1, decode=1, transfer=args.transfer, port=0, router=router, address=args.address)
    with bench_ray(args.address):
        cluster = Cluster(config).start()
        clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            import grpc

            from protos import generation_pb2 as pb
            from protos import generation_pb2_grpc as pb_grpc

            with grpc.insecure_channel(cluster.target) as channel:
                vocab = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=60).vocab_size

            def burst(n: int, seed: int) -> dict:
                requests = sample_random(vocab, n, args.input_len, args.output_len, 0.0, seed)
                with RssSampler() as rss:
                    outputs = clients.submit(send_burst, cluster.target, requests, seed).result()
                return summarize(outputs, rss.peak), outputs

            capacity, n = args.max_num_seqs, int(args.overload * args.max_num_seqs)
            burst(capacity, args.seed)  # warm-up: first steps compile and allocate
            baseline, _ = burst(capacity, args.seed + 1)
            invalid = clients.submit(send_burst, cluster.target, [SampleRequest([], 1)] * n, args.seed).result()  # empty: refused at once
            assert all(o.code == "INVALID_ARGUMENT" for o in invalid)
            floor = {"refusal_p50_ms": pct([o.latency for o in invalid], 50), "refusal_p99_ms": pct([o.latency for o in invalid], 99)}
            rounds = []
            for r in range(args.rounds):
                result, outputs = burst(n, args.seed + 2 + r)
                # The first `capacity` the router reserved for (its timeline), chosen by admission, not
                # by how fast they then went; the rest waited in the queue.
                at_once = sorted((o for o in outputs if o.success), key=lambda o: o.sent + reserved_after(o))[:capacity]
                result["admitted_at_once_ttft_p50_ms"] = pct([o.ttft for o in at_once], 50)
                result["admitted_at_once_e2el_p50_ms"] = pct([o.latency for o in at_once], 50)
                rounds.append(result)
        finally:
            clients.shutdown()
            cluster.stop()
    report = {"capacity": capacity, "max_waiting_requests": args.max_waiting_requests, "overload": args.overload,
              "input_len": args.input_len, "output_len": args.output_len, "transfer": cluster.config.transfer,
              "baseline": baseline, "invalid_argument_floor": floor, "rounds": rounds}  # fmt: skip
    _print(report)
    save_json(args.json, report)
    return report


def _print(r: dict) -> None:
    b = r["baseline"]
    print(f"\ncapacity {r['capacity']} running + {r['max_waiting_requests']} waiting; bursts of {r['overload']:g}x capacity")
    print(f"baseline ({b['sent']} at once): TTFT p50 {b['ttft_p50_ms']:.0f} ms, E2E p50 {b['e2el_p50_ms']:.0f} ms, "
          f"RSS {b['rss_peak_mib']:.0f} MiB")  # fmt: skip
    f = r["invalid_argument_floor"]
    print(f"floor: the same burst refused as INVALID_ARGUMENT (gRPC alone): p50 {f['refusal_p50_ms']:.0f} ms, "
          f"p99 {f['refusal_p99_ms']:.0f} ms")  # fmt: skip
    print(f"{'round':<7}{'sent':>6}{'served':>8}{'refused':>9}{'lost':>6}{'refusal p50/p99/max ms':>25}"
          f"{'TTFT p50 at once':>18}{'E2E p50 at once':>17}{'E2E p99 all':>13}{'RSS MiB':>9}")  # fmt: skip
    for i, x in enumerate(r["rounds"]):
        refusal = f"{x['refusal_p50_ms']:.0f}/{x['refusal_p99_ms']:.0f}/{x['refusal_max_ms']:.0f}"
        print(f"{i:<7}{x['sent']:>6}{x['served']:>8}{x['refused']:>9}{x['lost']:>6}{refusal:>25}"
              f"{x['admitted_at_once_ttft_p50_ms']:>18.0f}{x['admitted_at_once_e2el_p50_ms']:>17.0f}{x['e2el_p99_ms']:>13.0f}"
              f"{x['rss_peak_mib']:>9.0f}")  # fmt: skip


if __name__ == "__main__":
    main()

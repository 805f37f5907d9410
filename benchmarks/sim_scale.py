"""How fast the simulator runs a big cluster at a GPU cluster's request rate, and what sharding costs
in accuracy.

    pdserve bench sim-scale [--prefill 192 --decode 320] [--rate 12500] [--amplitude 0.8] [--duration 3600]
                            [--period 3600] [--shards 64] [--check-seconds 10] [--workload chat]
                            [--profile llama-3.1-8b-h100] [--slo-ttft-ms 300 --slo-itl-ms 30] [--json F]

1. The hour: a diurnal load (mean --rate requests/s, --amplitude, one --period) of the named
   workload's requests on a static cluster, simulated as one of --shards shards
   (simulator/shards.py): its CPU time, events and requests simulated, and the cluster's summary.
2. The check: --check-seconds of a constant load at the hour's peak rate (the hardest point of
   the day for a shard, whose router chooses among fewer workers), simulated whole and sharded:
   the latencies, SLO attainment and throughput of each, and the sharded run's error.

CPU time is this process's (the machine may be shared: wall time is reported too). The router's
policies run per request over every worker of a (shard's) pool, as in the real router, so their
share of the time is measured apart (the rest is the simulator's own).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from contextlib import contextmanager

from benchmarks import save_json

FIGURES = (("ttft_p50_ms", ("ttft_ms", "p50")), ("ttft_p90_ms", ("ttft_ms", "p90")), ("itl_p50_ms", ("itl_ms", "p50")),
           ("itl_p90_ms", ("itl_ms", "p90")), ("slo_attainment", ("slo_attainment",)))  # fmt: skip
COMPARED = (*(name for name, _ in FIGURES), "served_rps")


@contextmanager
def timed_policies(cpu: list):
    """Adds the CPU time spent in router.policy's per-request choices to cpu[0]."""
    from router import policy

    def timed(fn):
        def wrapper(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                cpu[0] += time.process_time() - t

        return wrapper

    def timed_lazily(fn):  # decode_order yields: its work happens as the caller takes workers
        def wrapper(*a, **k):
            it = fn(*a, **k)
            while True:
                t = time.process_time()
                try:
                    worker = next(it, None)
                finally:
                    cpu[0] += time.process_time() - t
                if worker is None:
                    return
                yield worker

        return wrapper

    originals = policy.decode_order, policy.choose_prefill
    policy.decode_order, policy.choose_prefill = timed_lazily(originals[0]), timed(originals[1])
    try:
        yield
    finally:
        policy.decode_order, policy.choose_prefill = originals


def measure(config, profile, load, shards: int, slo: dict) -> dict:
    """One run: its cost (CPU, wall, events, requests simulated) and the cluster's summary figures.
    served_rps: requests served per second of arrivals (the run's duration adds the drain after
    the last arrival, which would halve a 10 s run's rate)."""
    from benchmarks import run_report
    from simulator.cli import run

    policy_cpu = [0.0]
    with timed_policies(policy_cpu):
        wall, cpu = time.perf_counter(), time.process_time()
        result = run(config, profile, load, shards=shards)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    s = run_report.summarize(result.columns.arrays(), result.itl, slo, result.duration, result.worker_seconds, result.scale)
    simulated = len(result.columns)
    out = {"shards": shards, "simulated_seconds": result.duration, "requests_simulated": simulated, "cluster_requests": s["requests"],
           "events": result.stats["events"], "cpu_seconds": cpu, "wall_seconds": wall,
           "events_per_cpu_second": result.stats["events"] / cpu, "cpu_us_per_request": cpu / simulated * 1e6 if simulated else None,
           "router_policy_cpu_share": policy_cpu[0] / cpu, "worker_seconds": s["worker_seconds"]}  # fmt: skip
    for name, path in FIGURES:
        value = s
        for key in path:
            value = value[key]
        out[name] = value
    out["served_rps"] = s["ok"] / load.duration
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve bench sim-scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=192)
    parser.add_argument("--decode", type=int, default=320)
    parser.add_argument("--rate", type=float, default=12_500.0, help="mean requests/s (the default peaks at ~80%% of what "
                        "192P/320D serves at the SLOs, `pdserve sim search --shards 64`)")  # fmt: skip
    parser.add_argument("--amplitude", type=float, default=0.8)
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--period", type=float, default=3600.0)
    parser.add_argument("--shards", type=int, default=64, help="the hour is simulated as one of this many shards")
    parser.add_argument("--check-seconds", type=float, default=10.0, help="seconds of the peak rate simulated whole and sharded (0: none)")
    parser.add_argument("--workload", default="chat")
    parser.add_argument("--profile", default="llama-3.1-8b-h100")
    parser.add_argument("--slo-ttft-ms", type=float, default=300.0)
    parser.add_argument("--slo-itl-ms", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from benchmarks import workload as wl
    from engine.cost_model import load_profile
    from simulator import SimConfig

    profile = load_profile(args.profile)
    slo = {"ttft_ms": args.slo_ttft_ms, "itl_ms": args.slo_itl_ms}
    config = SimConfig(prefill=args.prefill, decode=args.decode, slo_ttft_ms=args.slo_ttft_ms, slo_itl_ms=args.slo_itl_ms)
    base = wl.named(args.workload, seed=args.seed)
    day = dataclasses.replace(base, pattern="diurnal", duration=args.duration,
                              params={"mean": args.rate, "amplitude": args.amplitude, "period": args.period})  # fmt: skip
    peak = day.peak_rate()
    out = {"workers": args.prefill + args.decode, "prefill": args.prefill, "decode": args.decode, "workload": args.workload,
           "profile": profile.name, "mean_rate": args.rate, "peak_rate": peak, "slo": slo, "shards": args.shards}  # fmt: skip
    out["hour"] = hour = measure(config, profile, day, args.shards, slo)
    print(f"{out['workers']} workers ({args.prefill}P/{args.decode}D), {args.duration:.0f} s of a diurnal {args.workload} load at "
          f"{args.rate:g} req/s mean ({peak:.0f} peak), one shard of {args.shards}: {hour['requests_simulated']} requests simulated "
          f"for the cluster's {hour['cluster_requests']}, {hour['events']} events")  # fmt: skip
    print(f"  CPU {hour['cpu_seconds']:.1f} s (wall {hour['wall_seconds']:.1f} s): {hour['events_per_cpu_second']:.0f} events/s, "
          f"{hour['cpu_us_per_request']:.0f} us per request simulated, {hour['router_policy_cpu_share']:.0%} of it in router.policy; "
          f"SLO attainment {hour['slo_attainment']}")  # fmt: skip
    if args.check_seconds > 0:
        steady = dataclasses.replace(base, pattern="constant", duration=args.check_seconds, params={"rate": peak})
        whole, sharded = (measure(config, profile, steady, s, slo) for s in (1, args.shards))
        error = {name: (sharded[name] - whole[name]) / whole[name] if whole[name] and sharded[name] is not None else None
                 for name in COMPARED}  # fmt: skip
        out["check"] = {"seconds": args.check_seconds, "rate": peak, "whole": whole, "sharded": sharded, "error": error}
        print(f"  check, {args.check_seconds:g} s at {peak:.0f} req/s: whole {whole['cpu_seconds']:.1f} CPU-s, sharded "
              f"{sharded['cpu_seconds']:.1f}; sharded vs whole: " + ", ".join(f"{n} {e:+.1%}" for n, e in error.items() if e is not None))  # fmt: skip
    save_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

"""How fast the simulator runs a big cluster: simulated events per second, and CPU per request.

    pdserve bench sim-scale [--prefill 192 --decode 320] [--rate 100] [--duration 3600] [--period 3600]
                            [--workload chat] [--profile llama-3.1-8b-h100] [--json F]

A diurnal load (mean --rate requests/s, amplitude 0.8, one --period) of the named workload's
requests on a static cluster. CPU time is this process's (the machine is shared: wall time is
reported too). The router's policies run per request over every worker of a pool, as in the
real router, so their share of the time is measured apart (the rest is the simulator's own).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from benchmarks import save_json


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve bench sim-scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=192)
    parser.add_argument("--decode", type=int, default=320)
    parser.add_argument("--rate", type=float, default=100.0, help="mean requests/s")
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--period", type=float, default=3600.0)
    parser.add_argument("--workload", default="chat")
    parser.add_argument("--profile", default="llama-3.1-8b-h100")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from benchmarks import run_report, workload as wl
    from engine.cost_model import load_profile
    from router import policy
    from simulator import SimConfig, Simulation

    profile = load_profile(args.profile)
    base = wl.named(args.workload, seed=args.seed)
    load = dataclasses.replace(base, pattern="diurnal", duration=args.duration,
                               params={"mean": args.rate, "amplitude": 0.8, "period": args.period})  # fmt: skip
    policy_cpu = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                policy_cpu[0] += time.process_time() - t

        return wrapper

    def timed_lazily(fn):  # decode_order yields: its work happens as the caller takes workers
        def wrapper(*a, **k):
            it = fn(*a, **k)
            while True:
                t = time.process_time()
                try:
                    worker = next(it, None)
                finally:
                    policy_cpu[0] += time.process_time() - t
                if worker is None:
                    return
                yield worker

        return wrapper

    originals = policy.decode_order, policy.choose_prefill
    policy.decode_order, policy.choose_prefill = timed_lazily(originals[0]), timed(originals[1])
    try:
        sim = Simulation(SimConfig(prefill=args.prefill, decode=args.decode), profile)
        wall, cpu = time.perf_counter(), time.process_time()
        result = sim.run(load.requests())
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        policy.decode_order, policy.choose_prefill = originals
    s = run_report.summarize(result.columns.arrays(), result.itl, {"ttft_ms": 1000, "itl_ms": 100}, result.duration, result.worker_seconds)
    n = result.stats["requests"]
    out = {
        "workers": args.prefill + args.decode, "prefill": args.prefill, "decode": args.decode, "workload": args.workload,
        "mean_rate": args.rate, "simulated_seconds": result.duration, "requests": n, "events": result.stats["events"],
        "cpu_seconds": cpu, "wall_seconds": wall, "events_per_cpu_second": result.stats["events"] / cpu,
        "cpu_us_per_request": cpu / n * 1e6 if n else None, "router_policy_cpu_share": policy_cpu[0] / cpu,
        "simulated_seconds_per_cpu_second": result.duration / cpu, "slo_attainment_1000_100": s["slo_attainment"],
        "ttft_p90_ms": s["ttft_ms"]["p90"], "itl_p90_ms": s["itl_ms"]["p90"],
    }  # fmt: skip
    print(f"{out['workers']} workers ({args.prefill}P/{args.decode}D), {args.duration:.0f} s of a diurnal {args.workload} load at "
          f"{args.rate:g} req/s mean: {n} requests, {out['events']} events")  # fmt: skip
    print(f"  CPU {cpu:.1f} s (wall {wall:.1f} s): {out['events_per_cpu_second']:.0f} events/s, {out['cpu_us_per_request']:.0f} us "
          f"per request, {out['router_policy_cpu_share']:.0%} of it in router.policy; {out['simulated_seconds_per_cpu_second']:.1f} "
          f"simulated seconds per CPU second")  # fmt: skip
    save_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

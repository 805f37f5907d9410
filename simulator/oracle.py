"""`pdserve sim oracle`: the fewest worker-seconds any planner could spend on a workload.

    pdserve sim oracle --max-prefill 2 --max-decode 4 [--workload diurnal --rate-scale X --time-scale X ...]
                       [--slo-ttft-ms 300 --slo-itl-ms 30] [--attainment 0.99] [--capacity-duration 20] [--json F]

The oracle knows the arrival rate at every instant and starts workers instantly. For every pool
(P prefill, D decode) within the bounds, the simulator finds the highest constant rate of the
workload's request mix that keeps the SLO attainment at or above --attainment (`sim search`'s
bisection); along the workload's rate curve the oracle then holds the pool of fewest workers
whose capacity covers the rate. Its worker-seconds, beside static-max's (the bounds' pools the
whole time) and the tightest static pool that covers the peak, are the floor for an autoscaled
run's: a planner pays start-up delays, prediction error and headroom on top. Pattern workloads
only: a trace has no rate curve to follow.
"""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks import save_json
from simulator.cli import add_common_args, sim_config_from_args, workload_from_args
from simulator.search import max_rate

_STEPS = 2000  # steps along the rate curve


def follow(capacities: dict[tuple[int, int], float], rate, span: float, steps: int = _STEPS) -> dict:
    """Worker-seconds of holding, at each instant of [0, span), the fewest-worker pool whose
    capacity (requests/s) covers `rate(t)`; where none does, the largest pool, and those seconds
    are counted as uncovered."""
    by_size = _by_size(capacities)
    largest = by_size[-1][0]
    dt = span / steps
    worker_seconds = uncovered = 0.0
    for i in range(steps):
        pool = _fewest(by_size, rate((i + 0.5) * dt))
        if pool is None:
            pool, uncovered = largest, uncovered + dt
        worker_seconds += sum(pool) * dt
    return {"worker_seconds": worker_seconds, "uncovered_seconds": uncovered}


def _by_size(capacities: dict[tuple[int, int], float]) -> list[tuple[tuple[int, int], float]]:
    """(pool, capacity) from the fewest workers up (then the fewest prefill workers)."""
    return sorted(capacities.items(), key=lambda item: (sum(item[0]), item[0]))


def _fewest(by_size: list[tuple[tuple[int, int], float]], demand: float) -> tuple[int, int] | None:
    """The first pool of `by_size` whose capacity covers `demand` requests/s; None if none does."""
    return next((pool for pool, capacity in by_size if capacity >= demand), None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve sim oracle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-prefill", type=int, required=True)
    parser.add_argument("--max-decode", type=int, required=True)
    add_common_args(parser)
    parser.add_argument("--attainment", type=float, default=0.99, help="SLO attainment a pool's capacity must keep")
    parser.add_argument("--iterations", type=int, default=5, help="bisection steps per pool")
    parser.add_argument("--capacity-duration", type=float, default=20.0, help="seconds of constant arrivals per capacity run")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.trace:
        parser.error("the oracle follows a pattern workload's rate curve: --workload, not --trace")
    if args.max_prefill < 1 or args.max_decode < 1:
        parser.error("--max-prefill and --max-decode must be at least 1")

    from engine.cost_model import load_profile

    profile = load_profile(args.profile)
    workload = workload_from_args(args)
    span = workload.span
    peak = workload.peak_rate()
    # The same request mix at 1 request/s: max_rate's scale is then the pool's capacity in requests/s.
    constant = dataclasses.replace(workload, pattern="constant", params={"rate": 1.0}, duration=args.capacity_duration,
                                   time_scale=1.0, rate_scale=1.0)  # fmt: skip
    capacities = {}
    print(f"{'pool':<8}{'max req/s':>11}")
    for p in range(1, args.max_prefill + 1):
        for d in range(1, args.max_decode + 1):
            found = max_rate(sim_config_from_args(args, prefill=p, decode=d), profile, constant, args.attainment, args.iterations, peak / 2)
            capacities[(p, d)] = found["scale"]
            print(f"{p}P/{d}D{'':<4}{found['scale']:>11.2f}", flush=True)
    oracle = follow(capacities, workload.rate, span)
    static_max = (args.max_prefill + args.max_decode) * span
    tightest = _fewest(_by_size(capacities), peak)
    result = {
        "workload": workload.to_dict(), "profile": profile.name, "attainment_target": args.attainment,
        "slo": {"ttft_ms": args.slo_ttft_ms, "itl_ms": args.slo_itl_ms}, "span_s": span, "peak_rate": peak,
        "capacities": [{"prefill": p, "decode": d, "max_rate": c} for (p, d), c in capacities.items()],
        **oracle, "static_max_worker_seconds": static_max, "share_of_static_max": oracle["worker_seconds"] / static_max,
        "tightest_static": None if tightest is None else {"prefill": tightest[0], "decode": tightest[1],
                                                          "worker_seconds": sum(tightest) * span,
                                                          "oracle_share": oracle["worker_seconds"] / (sum(tightest) * span)},
    }  # fmt: skip
    print(f"oracle: {oracle['worker_seconds']:.1f} worker-seconds over {span:g} s = {result['share_of_static_max']:.1%} of static-max "
          f"{args.max_prefill}P/{args.max_decode}D ({static_max:.1f})")  # fmt: skip
    if tightest is None:
        print(f"no pool within the bounds covers the peak ({peak:.1f} req/s): {oracle['uncovered_seconds']:.1f} s uncovered")
    else:
        t = result["tightest_static"]
        print(f"tightest static pool covering the peak ({peak:.1f} req/s): {tightest[0]}P/{tightest[1]}D, {t['worker_seconds']:.1f} "
              f"worker-seconds; the oracle spends {t['oracle_share']:.1%} of it")  # fmt: skip
    save_json(args.json, result)
    return result

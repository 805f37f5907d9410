"""`pdserve sim search`: the P:D split (and colocated) that serves the most requests per worker
under the SLOs, DistServe's placement question.

    pdserve sim search --workers 8 --slo-ttft-ms 1000 --slo-itl-ms 100 [--workload chat | --trace F]
                       [--attainment 0.9] [--duration 60] [--iterations 5] [--no-colocated] [--splits 2,3]
                       [--shards S] [--json F]

For every configuration tried, the workload's rate is scaled up and down (doubling to bracket,
then bisecting) to the largest rate whose SLO attainment (requests meeting both SLOs) stays at
or above --attainment: that rate divided by the workers is the goodput per worker. Up to 16
workers every split is tried; beyond, a coarse grid of splits (P = N/8 ... 7N/8), then halving
steps around the best one (goodput per worker is assumed unimodal in P). With --shards S the search
runs on one shard of the cluster (simulator/shards.py: --workers / S workers, a 1/S share of the
rate) and reports the cluster: splits and rates times S, so the splits tried are the shard's (every
one up to 16 shard workers, else the grid) times S; --splits and --guess stay the cluster's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

from benchmarks import save_json
from simulator.cli import add_common_args, sim_config_from_args, workload_from_args


def attainment(config, profile, workload, scale: float) -> dict:
    """One simulated run at `scale` times the workload's rate: its summary."""
    from benchmarks import run_report
    from simulator.simulation import Simulation

    scaled = dataclasses.replace(workload, rate_scale=workload.rate_scale * scale)
    result = Simulation(config, profile).run(scaled.requests())
    slo = {"ttft_ms": config.slo_ttft_ms, "itl_ms": config.slo_itl_ms}
    return run_report.summarize(result.columns.arrays(), result.itl, slo, result.duration, result.worker_seconds)


def max_rate(config, profile, workload, target: float, iterations: int, guess: float = 1.0) -> dict:
    """The largest rate scale meeting the attainment target (bracketed by doubling, then bisected)."""
    runs = []

    def ok(scale: float) -> bool:
        s = attainment(config, profile, workload, scale)
        runs.append((scale, s))
        return s["slo_attainment"] is not None and s["slo_attainment"] >= target

    lo, hi = guess, guess
    if ok(guess):
        while ok(hi * 2) and hi < 1e6:
            hi *= 2
        lo, hi = hi, hi * 2
    else:
        while not ok(lo / 2) and lo > 1e-6:
            lo /= 2
        lo, hi = lo / 2, lo
    for _ in range(iterations):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    best = max((r for r in runs if r[0] <= lo * (1 + 1e-9)), key=lambda r: r[0], default=(lo, None))
    return {"scale": lo, "summary": best[1], "runs": len(runs)}


def splits(n: int) -> list[int]:
    """Prefill pool sizes to try first."""
    if n <= 16:
        return list(range(1, n))
    return sorted({min(n - 1, max(1, round(n * k / 8))) for k in range(1, 8)})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve sim search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, required=True)
    add_common_args(parser)
    parser.add_argument("--attainment", type=float, default=0.9, help="SLO attainment a rate must keep")
    parser.add_argument("--iterations", type=int, default=5, help="bisection steps per configuration")
    parser.add_argument("--no-colocated", action="store_true", help="skip the colocated configuration")
    parser.add_argument("--splits", help="prefill pool sizes to try, comma-separated (no refinement)")
    parser.add_argument("--guess", type=float, help="the first rate scale tried (default: workers / 8)")
    parser.add_argument("--shards", type=int, default=1, help="search one of S identical shards and scale it up (simulator/shards.py)")
    parser.add_argument("--json", help="write the table here")
    parser.set_defaults(duration=60.0)
    args = parser.parse_args(argv)
    shards = args.shards
    if shards < 1 or args.workers % shards or args.workers // shards < 2:
        parser.error("--workers must be at least 2 (one prefill, one decode) in each of --shards equal shards")
    workers = args.workers // shards  # one shard's: every pool size and rate below is the shard's until the rows are written

    from engine.cost_model import load_profile

    profile = load_profile(args.profile)
    workload = workload_from_args(args)
    base_rate = _mean_rate(workload)
    started = time.perf_counter()
    rows: dict[tuple, dict] = {}
    guess = (args.guess or max(args.workers / 8, 0.125)) / shards

    def run(prefill: int, colocated: int = 0) -> dict:
        nonlocal guess
        key = (prefill, colocated)
        if key not in rows:
            pools = {"colocated": colocated} if colocated else {"prefill": prefill, "decode": workers - prefill}
            found = max_rate(sim_config_from_args(args, **pools), profile, workload, args.attainment, args.iterations, guess)
            guess = found["scale"] or guess
            s = found["summary"] or {}
            rate = base_rate * found["scale"] * shards
            rows[key] = {"prefill": 0 if colocated else prefill * shards, "decode": 0 if colocated else (workers - prefill) * shards,
                         "colocated": colocated * shards, "max_rate": rate, "per_worker": rate / args.workers,
                         "attainment": s.get("slo_attainment"), "ttft_p90_ms": (s.get("ttft_ms") or {}).get("p90"),
                         "itl_p90_ms": (s.get("itl_ms") or {}).get("p90"), "runs": found["runs"]}  # fmt: skip
            print(_row(rows[key]), flush=True)
        return rows[key]

    print(f"{'config':<10}{'max req/s':>11}{'per worker':>12}{'attain':>8}{'TTFT p90':>10}{'ITL p90':>9}{'runs':>6}")
    chosen = [int(p) for p in args.splits.split(",")] if args.splits else [p * shards for p in splits(workers)]
    if any(not 1 <= p < args.workers or p % shards for p in chosen):
        parser.error("--splits must be prefill pool sizes in [1, workers - 1], multiples of --shards")
    for p in chosen:
        run(p // shards)
    if workers > 16 and not args.splits:  # refine around the best split

        def best_split() -> int:  # the shard's prefill pool with the most goodput per worker so far
            return max((r for r in rows.values() if not r["colocated"]), key=lambda r: r["per_worker"])["prefill"] // shards

        coarse = splits(workers)
        best = best_split()
        step = max(1, (coarse[1] - coarse[0]) // 2)
        while step >= 1:
            for p in (best - step, best + step):
                if 1 <= p < workers:
                    run(p)
            best = best_split()
            step //= 2
    if not args.no_colocated:
        run(0, workers)
    table = sorted(rows.values(), key=lambda r: (r["colocated"] > 0, r["prefill"]))
    best = max(table, key=lambda r: r["per_worker"])
    print(f"best: {_name(best)}, {best['per_worker']:.3f} requests/s per worker at {args.attainment:.0%} SLO attainment "
          f"(TTFT {args.slo_ttft_ms:.0f} ms, ITL {args.slo_itl_ms:.0f} ms); searched in {time.perf_counter() - started:.0f} s")  # fmt: skip
    result = {
        "workers": args.workers, "shards": shards, "attainment_target": args.attainment, "slo": {"ttft_ms": args.slo_ttft_ms, "itl_ms": args.slo_itl_ms},
        "profile": profile.name, "workload": workload.to_dict(), "base_rate": base_rate, "rows": table, "best": best,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    save_json(args.json, result)
    return result


def _mean_rate(workload) -> float:
    """The workload's mean arrival rate (requests/s) at scale 1."""
    requests = list(workload.requests())
    span = getattr(workload, "span", None) or (requests[-1].time if requests else 1.0)
    return len(requests) / span if span else 0.0


def _name(row: dict) -> str:
    return f"{row['colocated']}C" if row["colocated"] else f"{row['prefill']}P/{row['decode']}D"


def _row(r: dict) -> str:
    fmt = lambda x, d: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    return (f"{_name(r):<10}{r['max_rate']:>11.2f}{r['per_worker']:>12.3f}{fmt(r['attainment'], 3):>8}"
            f"{fmt(r['ttft_p90_ms'], 0):>10}{fmt(r['itl_p90_ms'], 1):>9}{r['runs']:>6}")  # fmt: skip

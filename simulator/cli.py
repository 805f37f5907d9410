"""`pdserve sim`: one simulated run, written in the run-report format.

    pdserve sim [--profile llama-3.1-8b-h100] [--workload chat|interference|bursty|diurnal | --trace F.jsonl|F.csv]
                [--duration S] [--seed N] [--rate-scale X] [--time-scale X] [--save-workload F.jsonl]
                (--prefill N --decode M | --colocated N) [--transfer nccl|grpc]
                [--autoscale slo|predictive --min-prefill .. --max-decode .. --planner-interval S --planner-option NAME=VALUE]
                [--slo-ttft-ms 1000 --slo-itl-ms 100] --out run.json [--plot run.png] [--chrome-trace t.json]
    pdserve sim search --workers N ... (see simulator/search.py)
    pdserve sim oracle --max-prefill P --max-decode D ... (see simulator/oracle.py)

The same workload spec and seed give the same arrivals: `--save-workload` freezes them into a
JSONL trace that `pdserve bench autoscale --trace` (or another `pdserve sim --trace`) replays.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

DEFAULT_PROFILE = "llama-3.1-8b-h100"


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Profile, workload, engine and SLO options: shared by `sim`, `sim search` and `sim oracle`."""
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="cost profile: a shipped name or a JSON file")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="chat", help="a named workload: chat, interference, bursty, diurnal")
    w.add_argument("--trace", help="replay a trace instead: JSONL {timestamp, input_len, output_len} or an Azure CSV")
    w.add_argument("--duration", type=float, help="seconds of arrivals (default: the workload's)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate")
    w.add_argument("--time-scale", type=float, default=1.0, help="stretch the timeline")
    e = p.add_argument_group("engine (every worker)")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--max-num-batched-tokens", type=int, default=2048)
    e.add_argument("--chunk-size", type=int)
    e.add_argument("--kv-blocks", type=int, help="KV pool per worker in blocks (default: the profile's capacity)")
    e.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--transfer", default="nccl", help="KV transfer backend, as the profile names it")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-itl-ms", type=float, default=100.0)
    p.add_argument("--admission-timeout", type=float, default=60.0)
    p.add_argument("--max-waiting-requests", type=int, default=256)
    p.add_argument("--client-hop-ms", type=float, default=0.0, help="one-way latency of a client <-> router message, added to TTFT/E2E")
    p.add_argument("--worker-hop-ms", type=float, default=0.0,
                   help="one-way latency of a router <-> worker message (a Ray call, a poll's answer): 4 per request disaggregated, 2 colocated")


def workload_from_args(args):
    from benchmarks import workload

    if args.trace:
        return workload.Trace(args.trace, args.time_scale, args.rate_scale, args.duration)
    return workload.named(args.workload, duration=args.duration, seed=args.seed, time_scale=args.time_scale, rate_scale=args.rate_scale)


def engine_from_args(args):
    from simulator.config import EngineSpec

    return EngineSpec(block_size=args.block_size, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      chunk_size=args.chunk_size, enable_prefix_caching=not args.no_prefix_caching, num_kv_blocks=args.kv_blocks)  # fmt: skip


def sim_config_from_args(args, **pools):
    from simulator.config import SimConfig

    return SimConfig(engine=engine_from_args(args), transfer=args.transfer, admission_timeout=args.admission_timeout,
                     max_waiting_requests=args.max_waiting_requests, slo_ttft_ms=args.slo_ttft_ms, slo_itl_ms=args.slo_itl_ms,
                     client_hop=args.client_hop_ms / 1000, worker_hop=args.worker_hop_ms / 1000, **pools)  # fmt: skip


def planner_from_args(args, profile):
    from cluster.planner import Planner, PlannerConfig, parse_options

    names = ("min_prefill", "max_prefill", "min_decode", "max_decode", "min_colocated", "max_colocated")
    bounds = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        options = parse_options(args.planner_option)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    config = PlannerConfig(**{**dict(policy=args.autoscale, slo_ttft_ms=args.slo_ttft_ms, slo_itl_ms=args.slo_itl_ms,
                                     interval=args.planner_interval, prefill_max_tokens=args.max_num_batched_tokens,
                                     decode_max_batch=args.max_num_seqs, **bounds), **options})  # fmt: skip
    return Planner(config, profile)


def run_config(args, config, profile, workload, planner) -> dict:
    """The report's config: enough to rerun it."""
    return {
        "mode": config.mode, "pools": config.pools, "shards": args.shards, "policy": args.autoscale if planner else None,
        "planner": dataclasses.asdict(planner_config(planner, config, args.shards)) if planner else None,
        "slo": {"ttft_ms": config.slo_ttft_ms, "itl_ms": config.slo_itl_ms},
        "profile": {"name": profile.name, "source": profile.source, "model": profile.model, "hardware": profile.hardware},
        "workload": workload.to_dict(), "engine": dataclasses.asdict(config.engine), "transfer": config.transfer,
        "admission_timeout": config.admission_timeout, "max_waiting_requests": config.max_waiting_requests,
        "hops_ms": {"client": config.client_hop * 1000, "worker": config.worker_hop * 1000},
    }  # fmt: skip


def planner_config(planner, config, shards: int):
    """The bounds the planner really holds `config`'s cluster to (multiples of --shards)."""
    from simulator.shards import cluster_bounds

    return cluster_bounds(planner.config, shards, config.pools) if shards > 1 else planner.config


def simulate(args, config, profile, workload, planner=None):
    """`config`'s whole cluster, or with --shards S one shard of it scaled back up."""
    from benchmarks import run_report

    described = run_config(args, config, profile, workload, planner)
    result = run(config, profile, workload, planner, args.shards, args.seed)
    report = run_report.make_report(
        "sim", described, result.columns, result.samples, result.duration,
        result.worker_seconds, result.decisions, result.itl, step=config.sample_interval, max_records=args.max_records,
        extra={"sim_stats": result.stats}, scale=result.scale,
    )  # fmt: skip
    return report, result


def run(config, profile, workload, planner=None, shards: int = 1, seed: int = 0):
    """A SimResult for `config`'s cluster: simulated whole, or as one of `shards` shards (then
    the shard's planner is a copy of `planner` with a shard's bounds)."""
    from cluster.planner import Planner
    from simulator.shards import sample, scale_up, shard_bounds, shard_config
    from simulator.simulation import Simulation

    if planner is not None and shards > 1:
        planner = Planner(shard_bounds(planner.config, shards, config.pools), planner.profile)
    result = Simulation(shard_config(config, shards), profile, planner).run(sample(workload, shards, seed))
    return scale_up(result, shards)


def main(argv=None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["search"]:
        from simulator import search

        return search.main(argv[1:])
    if argv[:1] == ["oracle"]:
        from simulator import oracle

        return oracle.main(argv[1:])
    parser = argparse.ArgumentParser(prog="pdserve sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    pools = parser.add_argument_group("pools")
    pools.add_argument("--prefill", type=int, default=1)
    pools.add_argument("--decode", type=int, default=1)
    pools.add_argument("--colocated", type=int, default=0)
    pools.add_argument("--shards", type=int, default=1, help="simulate one of S identical shards of the cluster, each fed a random "
                       "1/S of the arrivals, and report the cluster as S of them (simulator/shards.py): big clusters at high rates")  # fmt: skip
    plan = parser.add_argument_group("autoscaling (the cluster's planner, on the simulated clock)")
    plan.add_argument("--autoscale", choices=["slo", "predictive"])
    for name in ("min-prefill", "max-prefill", "min-decode", "max-decode", "min-colocated", "max-colocated"):
        plan.add_argument(f"--{name}", type=int)
    plan.add_argument("--planner-interval", type=float, default=10.0)
    plan.add_argument("--planner-option", action="append", default=[], metavar="NAME=VALUE",
                      help="any other PlannerConfig field, as `pdserve serve` takes it (e.g. horizon=45 down_cooldown=30)")  # fmt: skip
    plan.add_argument("--startup-seconds", type=float, help="a new worker's start-up (default: the profile's)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", help="the run report (JSON)")
    out.add_argument("--plot", help="load, replicas and SLO attainment over time (PNG)")
    out.add_argument("--chrome-trace", help="a Chrome/Perfetto trace of the first --trace-seconds")
    out.add_argument("--trace-seconds", type=float, default=10.0)
    out.add_argument("--save-workload", help="freeze the arrivals into this JSONL trace")
    out.add_argument("--max-records", type=int, default=200_000, help="per-request records kept in the report")
    out.add_argument("--compare", metavar="DIR", help="instead of one run: static pools at the planner's min and max bounds (and "
                     "--static splits) and both planner policies, on the same arrivals; reports, a table and one plot in DIR")
    out.add_argument("--static", help="more static pools for --compare: P:D or NC, comma-separated (e.g. 2:6,4:4,8C)")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args, parser)

    from benchmarks import chrome_trace, run_report, workload as wl
    from engine.cost_model import load_profile

    profile = load_profile(args.profile)
    workload = workload_from_args(args)
    config = dataclasses.replace(
        sim_config_from_args(args, prefill=args.prefill, decode=args.decode, colocated=args.colocated),
        startup_seconds=args.startup_seconds, trace_until=args.trace_seconds if args.chrome_trace else 0.0,
    )  # fmt: skip
    planner = planner_from_args(args, profile) if args.autoscale else None
    check_shards(parser, args.shards, [config.pools], planner and planner.config)
    if args.save_workload:
        print(f"workload: {wl.write_jsonl(workload.requests(), args.save_workload)} requests -> {args.save_workload}")
    report, result = simulate(args, config, profile, workload, planner)
    s = result.stats
    print(run_report.table({"sim": report}))
    shard = f" (one shard of {args.shards}: the cluster's counts are {args.shards}x these)" if args.shards > 1 else ""
    print(f"simulated {result.duration:.0f} s, {s['requests']} requests, {s['events']} events in {s['wall_seconds']:.2f} s "
          f"({s['events_per_second']:.0f} events/s){shard}")  # fmt: skip
    if args.out:
        run_report.save(report, args.out)
        print(f"report: {args.out}")
    if args.plot:
        run_report.plot({args.out or "sim": report}, args.plot)
        print(f"plot: {args.plot}")
    if args.chrome_trace:
        n = chrome_trace.write(result.spans, args.chrome_trace, {"kind": "sim", "config": report["config"]})
        print(f"chrome trace: {n} spans -> {args.chrome_trace}")
    return report


def check_shards(parser, shards: int, pools: list[dict], planner_config=None) -> None:
    """A usage error, not a traceback, when --shards does not divide the pools or the planner's bounds."""
    from simulator.config import SimConfig
    from simulator.shards import cluster_bounds, shard_config

    try:
        for p in pools:
            shard_config(SimConfig(**p), shards)
        if planner_config is not None:
            cluster_bounds(planner_config, shards, pools[0])
    except ValueError as e:
        parser.error(str(e))


def compare(args, parser) -> dict:
    """Static pools against the planner, one workload, one table and one plot (issue 9's --compare)."""
    import os

    from benchmarks import run_report
    from engine.cost_model import load_profile

    profile = load_profile(args.profile)
    workload = workload_from_args(args)
    colocated = bool(args.colocated)
    bounds = planner_from_args(argparse.Namespace(**{**vars(args), "autoscale": "slo"}), profile).config
    runs: dict[str, tuple] = {}
    roles = ("colocated",) if colocated else ("prefill", "decode")
    for edge in ("min", "max"):
        runs[f"static-{edge}"] = ({role: getattr(bounds, f"{edge}_{role}") for role in roles}, None)
    for spec in filter(None, (args.static or "").split(",")):
        pools = {"colocated": int(spec[:-1])} if spec.endswith("C") else dict(zip(("prefill", "decode"), map(int, spec.split(":"))))
        runs[f"static-{spec.replace(':', 'P')}"] = (pools, None)
    for policy in ("slo", "predictive"):
        start = {role: getattr(bounds, f"min_{role}") for role in roles}
        runs[policy] = (start, policy)
    check_shards(parser, args.shards, [pools for pools, _ in runs.values()], bounds)
    os.makedirs(args.compare, exist_ok=True)
    reports = {}
    for label, (pools, policy) in runs.items():
        config = dataclasses.replace(sim_config_from_args(args, **pools), startup_seconds=args.startup_seconds)
        run_args = argparse.Namespace(**{**vars(args), "autoscale": policy})
        planner = planner_from_args(run_args, profile) if policy else None
        report, result = simulate(run_args, config, profile, workload, planner)
        run_report.save(report, os.path.join(args.compare, f"{label}.json"))
        reports[label] = report
        print(f"{label}: {result.stats['requests']} requests simulated in {result.stats['wall_seconds']:.1f} s", flush=True)
    print(run_report.table(reports))
    run_report.plot(reports, os.path.join(args.compare, "compare.png"))
    print(f"reports and compare.png in {args.compare}")
    return reports


if __name__ == "__main__":
    main()

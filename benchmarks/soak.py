"""Soak: a steady mixed load for a long time while workers are killed, and what it leaves behind.

    pdserve bench soak [--duration 10m] [--kill-every 3m] [--prefill 2] [--decode 2] [--concurrency 8]
                       [--cancel-rate 0.1] [--transfer auto] [--json F] [--plot F.png]

A cluster (started here, on a local Ray unless --address) serves --concurrency closed-loop clients
(in a process of their own) for --duration: random prompts of 8-256 tokens and replies of 4-96,
a quarter greedy, a quarter seeded sampling, a quarter greedy with stop strings, a quarter seeded
with stop strings; --cancel-rate of them are cancelled by the client mid-stream. Every --kill-every
one worker's process is SIGKILLed (the pid `pdserve status` shows), a decode worker first, then a
prefill worker, alternating, the busiest of its pool; a pool left with one ready worker is spared
(that kill is skipped and reported), since its new requests would have nowhere to go. The cluster
replaces each dead worker; its requests move.

Reported (JSON): requests served, cancelled and failed (by gRPC status; goal: none), requests that
moved (the router's pdserve_migrations_total / pdserve_retries_total by reason, and the served
requests whose timeline has a "migrated" event: after their first token a migration, before it a
retry), the kills, the KV blocks still in use once the load has stopped and the cluster is idle
(goal: 0), the workers' invariant check, the pools' sizes at the end (goal: back to full), and the
RSS of the router (this process) and of every worker (psutil, on the pids status reports) sampled
over time (goal: flat), with the machine's load average.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import signal
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor

from benchmarks import add_cluster_args, bench_ray, save_json

MIB = 1 << 20
STOPS = ([".", "\n"], [","], [" the", "?"])


def seconds(text: str) -> float:
    """'90', '90s', '10m', '1h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def mixed_request(vocab: int, rng: random.Random):
    """One request of the mix: (SampleRequest, ignore_eos)."""
    from benchmarks.serve import SampleRequest

    kind = rng.randrange(4)
    sampling = {"temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(2**31)} if kind % 2 else {}
    if kind >= 2:
        sampling["stop"] = rng.choice(STOPS)
    prompt = [rng.randrange(100, vocab - 100) for _ in range(rng.randint(8, 256))]
    return SampleRequest(prompt, rng.randint(4, 96), sampling=sampling), kind < 2


def moves(timeline: list[dict]) -> tuple[int, int]:
    """(migrations, retries) in a request's timeline: a move after its first token, or before it."""
    migrations = retries = 0
    streamed = False
    for event in sorted(timeline, key=lambda e: e["seconds"]):
        streamed |= event["name"] == "first_token"
        if event["name"] == "migrated":
            migrations, retries = (migrations + 1, retries) if streamed else (migrations, retries + 1)
    return migrations, retries


def run_clients(target: str, vocab: int, duration: float, concurrency: int, cancel_rate: float, seed: int) -> list[dict]:
    """In the clients' process: `concurrency` closed-loop clients for `duration` seconds."""
    from benchmarks.serve import Endpoint, _connect, send

    endpoint = Endpoint(target=target)

    async def client(stub, c: int, end: float, out: list[dict]):
        rng = random.Random(seed * 1000 + c)
        n = 0
        while time.monotonic() < end:
            request, ignore_eos = mixed_request(vocab, rng)
            cancel_after = rng.randint(1, max(1, request.output_len - 1)) if rng.random() < cancel_rate else None
            o = await send(stub, endpoint, request, ignore_eos, cancel_after, 600, f"soak-{c}-{n}")
            migrations, retries = moves(o.timeline)
            out.append({"code": o.code, "cancelled": o.cancelled, "output_tokens": o.output_tokens, "latency": o.latency,
                        "error": o.error, "migrations": migrations, "retries": retries})  # fmt: skip
            n += 1

    async def main():
        out: list[dict] = []
        end = time.monotonic() + duration
        async with _connect(endpoint, 600) as stub:
            await asyncio.gather(*(client(stub, c, end, out) for c in range(concurrency)))
        return out

    return asyncio.run(main())


def rss_mib(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / MIB
    except psutil.Error:
        return None


def state(target: str) -> list[dict]:
    from cluster.cli import fetch_state

    return fetch_state(target)["workers"]


def held(workers: list[dict]) -> int:
    """KV blocks in use, plus requests still running or waiting, over every worker."""
    return sum(w["kv_blocks"]["in_use"] + w["running"] + w["waiting"] for w in workers)


def counters(metrics_port: int, *names: str) -> dict[str, dict[str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, dict[str, float]] = {name: {} for name in names}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in out:
                out[s.name][s.labels.get("reason", "")] = s.value
    return out


def main(argv=None) -> dict:
    import ray

    from cluster.cluster import Cluster
    from cluster.config import ServeConfig
    from engine.config import EngineConfig

    parser = argparse.ArgumentParser(prog="pdserve bench soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=seconds, default=seconds("10m"), help="how long the load runs (90, 90s, 10m, 1h)")
    parser.add_argument("--kill-every", type=seconds, default=seconds("3m"), help="SIGKILL one worker this often (0: never)")
    parser.add_argument("--prefill", type=int, default=2)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--cancel-rate", type=float, default=0.1)
    parser.add_argument("--rss-every", type=seconds, default=5.0, help="RSS sampling interval")
    add_cluster_args(parser)
    parser.add_argument("--plot", help="RSS over time, kills marked (PNG)")
    args = parser.parse_args(argv)

    engine = EngineConfig(model=args.model, kv_cache_gb=args.kv_cache_gb, max_model_len=1024)
    config = ServeConfig(engine=engine, prefill=args.prefill, decode=args.decode, transfer=args.transfer, port=0, metrics_port=0,
                         address=args.address)  # fmt: skip
    with bench_ray(args.address):
        load_at_start = os.getloadavg()
        cluster = Cluster(config).start()
        clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            import grpc

            from protos import generation_pb2 as pb
            from protos import generation_pb2_grpc as pb_grpc

            with grpc.insecure_channel(cluster.target) as channel:
                vocab = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=60).vocab_size
            start = time.monotonic()
            load = clients.submit(run_clients, cluster.target, vocab, args.duration, args.concurrency, args.cancel_rate, args.seed)
            kills, rss = watch(cluster.target, load, start, args)
            outcomes = load.result()
            load_at_end = os.getloadavg()
            ended = time.monotonic() - start
            idle = settle(cluster.target, {"prefill": args.prefill, "decode": args.decode})
            invariants = ray.get([w.handle.check_invariants.remote() for w in cluster.router.workers.values()], timeout=60)
            moved = counters(cluster.metrics_port, "pdserve_migrations_total", "pdserve_retries_total")
        finally:
            clients.shutdown()
            cluster.stop()
    served = [o for o in outcomes if o["code"] == "OK" and not o["cancelled"]]
    failed: dict[str, int] = {}
    for o in outcomes:
        if o["code"] != "OK":
            failed[o["code"]] = failed.get(o["code"], 0) + 1
    report = {
        "config": {k: getattr(args, k) for k in ("duration", "kill_every", "prefill", "decode", "concurrency", "cancel_rate", "seed")}
                  | {"transfer": cluster.config.transfer},
        "load_average": {"start": load_at_start, "end": load_at_end}, "load_seconds": ended,
        "requests": {"sent": len(outcomes), "served": len(served), "cancelled": sum(o["cancelled"] for o in outcomes),
                     "failed": failed, "errors": sorted({o["error"] for o in outcomes if o["error"]})[:10],
                     "output_tokens": sum(o["output_tokens"] for o in outcomes)},
        "moved": {"migrations_by_reason": moved["pdserve_migrations_total"], "retries_by_reason": moved["pdserve_retries_total"],
                  "served_after_migration": sum(o["migrations"] > 0 for o in served),
                  "served_after_retry": sum(o["retries"] > 0 for o in served)},
        "kills": kills, "blocks_leaked": idle["blocks_leaked"], "pools_at_end": idle["pools"],
        "invariant_violations": sum(invariants), "rss": rss, "rss_summary": rss_summary(rss),
    }  # fmt: skip
    _print(report)
    save_json(args.json, report)
    if args.plot:
        plot(report, args.plot)
    return report


def watch(target: str, load, start: float, args) -> tuple[list[dict], list[dict]]:
    """While the load runs: RSS samples every --rss-every, a kill every --kill-every."""
    kills, samples = [], []
    roles = ["decode", "prefill"]
    next_kill = args.kill_every if args.kill_every > 0 else float("inf")
    next_sample = 0.0
    while not load.done():
        now = time.monotonic() - start
        if now >= next_sample:
            workers = state(target)
            samples.append({"t": round(now, 2), "router_mib": rss_mib(os.getpid()),
                            "workers_mib": {w["id"]: rss_mib(w["pid"]) for w in workers if w["pid"] and w["state"] != "dead"}})  # fmt: skip
            next_sample += args.rss_every
        if now >= next_kill and now < args.duration:
            role = roles[len(kills) % 2]
            kills.append(kill_one(target, role, now))
            next_kill += args.kill_every
        time.sleep(0.2)
    return kills, samples


def kill_one(target: str, role: str, now: float) -> dict:
    ready = [w for w in state(target) if w["role"] == role and w["state"] == "ready"]
    if len(ready) < 2:
        return {"t": round(now, 2), "role": role, "skipped": f"only {len(ready)} ready {role} worker(s)"}
    victim = max(ready, key=lambda w: (w["running"] + w["waiting"], w["kv_blocks"]["in_use"]))
    os.kill(victim["pid"], signal.SIGKILL)
    return {"t": round(now, 2), "role": role, "worker": victim["id"], "pid": victim["pid"], "running": victim["running"]}


def settle(target: str, pools: dict[str, int], timeout: float = 300) -> dict:
    """Once the load has stopped: wait (bounded) for the pools to be full and the workers idle."""
    deadline = time.monotonic() + timeout
    while True:
        workers = state(target)
        ready = {role: sum(w["role"] == role and w["state"] == "ready" for w in workers) for role in pools}
        if (ready == pools and held(workers) == 0) or time.monotonic() > deadline:
            return {"pools": ready, "blocks_leaked": sum(w["kv_blocks"]["in_use"] for w in workers), "held": held(workers)}
        time.sleep(0.5)


def rss_summary(samples: list[dict]) -> dict:
    """Per process: the first, last and peak RSS (MiB), and its growth over the second half of the
    time it was sampled (a process that still grows late in its own life, replacements included,
    has not levelled off; the first half holds its warm-up: the KV pool's first touch)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        for name, mib in [("router", s["router_mib"]), *s["workers_mib"].items()]:
            if mib is not None:
                series.setdefault(name, []).append((s["t"], mib))
    out = {}
    for name, points in series.items():
        half = (points[0][0] + points[-1][0]) / 2
        late = [mib for t, mib in points if t >= half]
        out[name] = {"first": points[0][1], "last": points[-1][1], "peak": max(m for _, m in points),
                     "late_growth": late[-1] - late[0], "from_s": points[0][0], "to_s": points[-1][0]}  # fmt: skip
    return out


def _print(r: dict) -> None:
    q, c = r["requests"], r["config"]
    print(f"\nsoak: {r['load_seconds']:.0f}s of {c['concurrency']} clients on {c['prefill']} prefill + {c['decode']} decode "
          f"({c['transfer']}), load average {r['load_average']['start'][0]:.1f} -> {r['load_average']['end'][0]:.1f}")  # fmt: skip
    print(f"requests: {q['sent']} sent, {q['served']} served, {q['cancelled']} cancelled by the client, failed: {q['failed'] or 'none'}")
    m = r["moved"]
    print(f"moved: migrations {m['migrations_by_reason'] or {}}, retries {m['retries_by_reason'] or {}}; "
          f"served after a migration {m['served_after_migration']}, after a retry {m['served_after_retry']}")  # fmt: skip
    for k in r["kills"]:
        print(f"  t={k['t']:>6.0f}s kill {k['role']}: " + (k.get("skipped") or f"{k['worker']} (pid {k['pid']}, {k['running']} running)"))
    print(f"blocks leaked once idle: {r['blocks_leaked']}; invariant violations: {r['invariant_violations']}; pools at the end: {r['pools_at_end']}")
    print(f"{'process':<12}{'first MiB':>10}{'last MiB':>10}{'peak MiB':>10}{'growth, 2nd half of life':>26}")
    for name, s in r["rss_summary"].items():
        print(f"{name:<12}{s['first']:>10.0f}{s['last']:>10.0f}{s['peak']:>10.0f}{s['late_growth']:>26.1f}")


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = sorted({n for s in r["rss"] for n in s["workers_mib"]})
    for name in ["router", *names]:
        points = [(s["t"], s["router_mib"] if name == "router" else s["workers_mib"].get(name)) for s in r["rss"]]
        points = [(t, m) for t, m in points if m is not None]
        if points:
            ax.plot(*zip(*points), label=name, linewidth=2 if name == "router" else 1)
    for k in r["kills"]:
        if "worker" in k:
            ax.axvline(k["t"], color="red", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds (dotted: a worker SIGKILLed)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("pdserve bench soak: RSS of the router and each worker")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

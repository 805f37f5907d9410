"""The router at GPU rates: one real router in front of mock decode workers stepping at a GPU
profile's rate, C concurrent streams.

    pdserve bench router [--engine mock:llama-3.1-8b-h100] [--prefill 1] [--decode 2]
                         [--concurrency 64 256] [--window 10] [--idle 3] [--input-len 32]
                         [--stream-interval 1] [--json F]

The workers are mock (`--engine mock:PROFILE`: no model; each step lasts what the GPU profile
predicts for its batch, so a decode worker emits tokens at a GPU's rate); the router is real: a
`pdserve serve` process of its own (its Ray driver, long polls of the decode workers,
detokenization, gRPC server), so its CPU is its process's. The clients run in another process and
keep C streams in flight (greedy, ignore_eos, outputs as long as --max-model-len allows; a
stream that ends is replaced at once), so decode dominates. First the router's idle CPU rate
over --idle seconds; then per concurrency C streams, and once every one of them is decoding, a
window of --window seconds measures:

  tokens_per_s               streamed tokens the clients received, per second
  router_cpu_ms_per_1k_tokens  the router process's CPU time (utime + stime of /proc/PID/stat, all
                             its threads) per 1,000 streamed tokens, its idle rate subtracted
  router_cores               the router's CPU-seconds per second in the window (1.0: one core busy)
  added_latency_p50/p99_ms   per response, the client's receipt time minus the `step_time` the
                             decode worker stamped when the step's outputs were produced (the
                             oldest step in what the router collected): Ray's hop, the router's
                             work, gRPC's, and the client reading it (one machine, one clock)
  responses_per_token        gRPC messages per streamed token (< 1 when the router coalesces)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from benchmarks import free_port, save_json

MS = 1000.0
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of proc(5)


def idle_rate(pid: int, seconds: float) -> float:
    """The process's CPU-seconds per second while nothing is asked of it."""
    start, t0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return (cpu_seconds(pid) - start) / (time.perf_counter() - t0)


# --- the clients (a process of their own) ----------------------------------------------------------


def run_streams(target: str, router_pid: int, concurrency: int, input_len: int, max_tokens: int, vocab: int,
                window: float, seed: int, start_timeout: float = 300.0) -> dict:  # fmt: skip
    return asyncio.run(_streams(target, router_pid, concurrency, input_len, max_tokens, vocab, window, seed, start_timeout))


async def _streams(target, router_pid, concurrency, input_len, max_tokens, vocab, window, seed, start_timeout) -> dict:
    import grpc

    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    started = [False] * concurrency
    m = {"measuring": False, "tokens": 0, "responses": 0, "latencies": [], "errors": []}
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def stream(stub, i: int) -> None:
        while True:  # a stream that ends is replaced at once: `concurrency` always in flight
            ids = rng.integers(100, vocab, size=input_len).tolist()
            try:
                async for r in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling), timeout=3600):
                    now = time.time()
                    started[i] = True
                    if m["measuring"]:
                        m["tokens"] += len(r.token_ids)
                        m["responses"] += 1
                        if r.step_time:
                            m["latencies"].append(now - r.step_time)
            except grpc.aio.AioRpcError as e:
                if m["measuring"]:
                    m["errors"].append(f"{e.code().name}: {e.details()}")
                await asyncio.sleep(0.1)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        tasks = [asyncio.create_task(stream(stub, i)) for i in range(concurrency)]
        deadline = time.monotonic() + start_timeout
        while not all(started) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        decoding = sum(started)
        await asyncio.sleep(1.0)  # past the last admissions' prefills
        cpu0, t0 = cpu_seconds(router_pid), time.perf_counter()
        m["measuring"] = True
        await asyncio.sleep(window)
        m["measuring"] = False
        cpu1, t1 = cpu_seconds(router_pid), time.perf_counter()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"decoding": decoding, "seconds": t1 - t0, "router_cpu_s": cpu1 - cpu0, "tokens": m["tokens"],
            "responses": m["responses"], "latencies": m["latencies"], "errors": sorted(set(m["errors"]))[:5]}  # fmt: skip


# --- the run -----------------------------------------------------------------------------------------


def engine_without_startup(engine: str, directory: str) -> str:
    """A mock engine's profile with no start-up wait (written into `directory`): what is measured is
    the router serving, and a GPU profile's start-up (30 s for the shipped one) would only delay it."""
    kind, _, spec = engine.partition(":")
    if kind != "mock":
        return engine
    from benchmarks.autoscale import slowed_profile

    return f"mock:{slowed_profile(spec, 1.0, directory, startup=0.0)}"


def start_server(args, port: int, log, engine: str, tries: int = 3) -> subprocess.Popen:
    """`pdserve serve` on mock workers; tried again when Ray's node does not come up in time (a
    loaded machine: Ray waits 30 s for its raylet, a fixed limit)."""
    max_num_seqs = -(-max(args.concurrency) // args.decode)
    command = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--engine", engine,
               "--prefill", str(args.prefill), "--decode", str(args.decode), "--max-num-seqs", str(max_num_seqs),
               "--max-model-len", str(args.max_model_len), "--kv-cache-gb", str(args.kv_cache_gb),
               "--mock-kv-fraction", str(args.mock_kv_fraction), "--max-waiting-requests", str(4 * max(args.concurrency)),
               "--stream-interval", str(args.stream_interval), "--shutdown-grace", "5",
               *(["--model", args.model] if args.model else [])]  # fmt: skip
    attempt = 0
    while True:
        attempt += 1
        log.seek(0)
        log.truncate()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + args.start_timeout
        while "pdserve is serving" not in open(log.name).read() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if proc.poll() is None and "pdserve is serving" in open(log.name).read():
            return proc
        stop_server(proc)
        if "timed out during startup" not in open(log.name).read() or attempt == tries:
            raise RuntimeError(f"pdserve serve did not start:\n{open(log.name).read()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left (Ray's processes)
    except ProcessLookupError:
        pass


def summarize(concurrency: int, idle: float, r: dict) -> dict:
    lat = np.array(r["latencies"]) * MS
    busy = r["router_cpu_s"] - idle * r["seconds"]
    return {
        "concurrency": concurrency, "decoding": r["decoding"], "window_s": r["seconds"], "tokens": r["tokens"],
        "tokens_per_s": r["tokens"] / r["seconds"], "responses_per_token": r["responses"] / max(r["tokens"], 1),
        "router_idle_cores": idle, "router_cores": r["router_cpu_s"] / r["seconds"],
        "router_cpu_ms_per_1k_tokens": busy / max(r["tokens"], 1) * 1e6,
        "added_latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else 0.0,
        "added_latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else 0.0,
        "errors": r["errors"], "loadavg": os.getloadavg()[0],
    }  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve bench router", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="mock:llama-3.1-8b-h100", help="the workers' engine (real: the model itself)")
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256], help="streams in flight (the issue's sweep: 64 256 1024)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured per concurrency")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds measuring the router's idle CPU rate")
    parser.add_argument("--stream-interval", type=int, default=1, help="the router's: tokens per response at least")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=4096, help="prompt + output: the streams' length")
    parser.add_argument("--model")
    parser.add_argument("--kv-cache-gb", type=float, default=0.1)
    parser.add_argument("--mock-kv-fraction", type=float, default=0.001, help="mock: share of the profiled model's KV bytes kept")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)

    from engine.llm_engine import load_model_config
    from engine.model_files import resolve_model_dir

    vocab = load_model_config(resolve_model_dir(args.model)).vocab_size
    port = free_port()
    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with tempfile.TemporaryDirectory(prefix="pdserve-router-bench-") as tmp, open(os.path.join(tmp, "serve.log"), "w+") as log:
        proc = start_server(args, port, log, engine_without_startup(args.engine, tmp))
        target = f"127.0.0.1:{port}"
        results = []
        try:
            max_tokens = args.max_model_len - args.input_len
            clients.submit(run_streams, target, proc.pid, 4, args.input_len, 8, vocab, 0.5, args.seed).result()  # warm-up
            time.sleep(1.0)
            idle = idle_rate(proc.pid, args.idle)  # once, before any load: after one, its aborts are still settling
            for i, c in enumerate(args.concurrency):
                r = clients.submit(run_streams, target, proc.pid, c, args.input_len, max_tokens, vocab, args.window, args.seed + i)
                results.append(summarize(c, idle, r.result()))
                _print_row(results[-1])
        finally:
            clients.shutdown()
            stop_server(proc)
    report = {"engine": args.engine, "prefill": args.prefill, "decode": args.decode, "stream_interval": args.stream_interval,
              "input_len": args.input_len,
              "window_s": args.window, "cpus": os.cpu_count(), "results": results,
              "note": "mock workers (timed stand-ins on the profile, its start-up skipped) behind the real router process"}  # fmt: skip
    save_json(args.json, report)
    return report


def _print_row(x: dict) -> None:
    if not hasattr(_print_row, "header"):
        _print_row.header = True
        print(f"{'streams':>8}{'decoding':>9}{'tokens/s':>10}{'router ms CPU/1k tok':>22}{'router cores':>14}{'idle':>7}"
              f"{'added p50 ms':>14}{'p99 ms':>9}{'resp/tok':>10}{'load':>7}")  # fmt: skip
    print(f"{x['concurrency']:>8}{x['decoding']:>9}{x['tokens_per_s']:>10.0f}{x['router_cpu_ms_per_1k_tokens']:>22.1f}"
          f"{x['router_cores']:>14.2f}{x['router_idle_cores']:>7.3f}{x['added_latency_p50_ms']:>14.1f}"
          f"{x['added_latency_p99_ms']:>9.1f}{x['responses_per_token']:>10.2f}{x['loadavg']:>7.1f}", flush=True)  # fmt: skip
    if x["errors"]:
        print(f"  errors: {x['errors']}")


if __name__ == "__main__":
    main()

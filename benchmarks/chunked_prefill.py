"""Inter-token latency (the gap between a sequence's consecutive tokens) of decoding sequences while a long prompt arrives, colocated (one engine
doing both phases), with chunked prefill on and off.

    python -m benchmarks.chunked_prefill [--decoders 16] [--prompt-tokens 4000] [--chunk-size 512]

16 sequences are decoding when a 4,000-token prompt arrives. Each step's duration is the
inter-token latency of every decoder in it. Chunking on: decodes go first in every step and the
prompt fills the rest of the budget a chunk at a time (SARATHI's decode-maximal batching), so
no decoder waits much longer than one chunk's compute. Off: the prompt runs whole in one step,
and every decoder waits for all of it. The price of chunking is reported beside it: the long
prompt's own time to its first token, and the decoders' tokens per second over that time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import save_json
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def run(chunked: bool, decoders: int, prompt_tokens: int, chunk_size: int, model: str | None) -> dict:
    engine = LLMEngine(EngineConfig(model=model, kv_cache_gb=1.0, max_model_len=prompt_tokens + 512,
                                    enable_chunked_prefill=chunked, chunk_size=chunk_size,
                                    max_num_batched_tokens=max(chunk_size + decoders, 256), max_num_seqs=64,
                                    enable_prefix_caching=False))  # fmt: skip
    decode = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i in range(decoders):
        engine.add_request(f"d{i}", engine.tokenizer.encode(f"Story number {i}: once upon a time"), decode)
    for _ in range(4):  # everyone is decoding now
        engine.step()
    last_token = {f"d{i}": time.perf_counter() for i in range(decoders)}
    arrived = time.perf_counter()
    engine.add_request("long", list(range(1000, 1000 + prompt_tokens)), SamplingParams(temperature=0, max_tokens=1))
    itl, steps, after, decoded, prompt_done = [], 0, 0, 0, None
    while after < 2:  # the steps until the prompt's is done, that one, and one more (decoders it held up)
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            if o.request_id in last_token and o.new_token_ids:
                itl.append((now - last_token[o.request_id]) * 1e3)
                last_token[o.request_id] = now
                decoded += len(o.new_token_ids) if prompt_done is None else 0
        steps += 1
        if after or any(o.request_id == "long" and o.finished for o in outputs):
            prompt_done = prompt_done or now
            after += 1
    start = time.perf_counter()
    engine.step()  # a plain decode step, for scale
    plain_ms = (time.perf_counter() - start) * 1e3
    return {
        "p50_itl_ms": float(np.percentile(itl, 50)), "p99_itl_ms": float(np.percentile(itl, 99)),
        "max_itl_ms": max(itl), "decode_only_step_ms": plain_ms, "steps": steps,
        "prompt_ttft_ms": (prompt_done - arrived) * 1e3, "decoder_tokens_per_s": decoded / (prompt_done - arrived),
    }  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve bench chunked-prefill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--decoders", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--model")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = {mode: run(mode == "chunked", args.decoders, args.prompt_tokens, args.chunk_size, args.model)
              for mode in ("chunked", "unchunked")}  # fmt: skip
    print(f"\n{args.decoders} decoding sequences while a {args.prompt_tokens}-token prompt arrives (chunk {args.chunk_size}):")
    for mode, r in result.items():
        print(f"  {mode:<10} ITL p50 {r['p50_itl_ms']:8.1f} ms  p99 {r['p99_itl_ms']:8.1f} ms  max {r['max_itl_ms']:8.1f} ms"
              f"  over {r['steps']} steps  (decode-only step {r['decode_only_step_ms']:.1f} ms)")  # fmt: skip
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()

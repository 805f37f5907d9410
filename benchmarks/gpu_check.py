"""`make gpu-check`: what a machine with a GPU must show before pdserve's CUDA paths are trusted.

    python -m benchmarks.gpu_check [--results benchmarks/RESULTS.md] [--skip-tests] [--skip-transfer]

1. The tests that hold the CUDA paths, run on the GPU: the Triton kernels compiled, against the
   torch reference (float32, float16, bfloat16); the engine against transformers (float32 on the
   GPU, and its bfloat16 default against transformers in bfloat16); KV transfer between pools on
   the GPU (grpc; NCCL when there are two GPUs).
2. The memory-bound kernels against the card's own copy bandwidth, measured in the same run (a
   torch device-to-device copy; bytes read + written per second): decode attention (the K/V bytes
   it reads) and the KV write (store_kv: bytes read + written), at the default model's KV layout
   and at an 8B-class one.
3. The KV-transfer benchmark between two GPU pools (grpc; nccl when there are two GPUs).

The results go into benchmarks/RESULTS.md in a section named after the GPU, between markers, so a
rerun on the same card replaces its own section. Exit status: 0 all passed, 1 a check failed (the
section says which), 2 no GPU (nothing is written).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
TESTS = ["tests/test_kernels.py", "tests/test_engine_tiny.py", "tests/test_default_model.py", "tests/test_kv_transfer.py"]
# (name, KV heads, query heads per KV head, head dim): the default model's layout, and Llama-3-8B's
SHAPES = [("smollm2-135m", 3, 3, 64), ("llama-8b", 8, 4, 128)]
NO_GPU = ("gpu-check: torch sees no CUDA GPU here (torch {torch}, CUDA build {cuda}). Run `make gpu-check` on a "
          "machine with an NVIDIA GPU; nothing was checked and nothing written.")  # fmt: skip


# --- timing -----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int = 20) -> float:
    """Median wall time of fn() over `repeats` runs, after a warm-up (compilation, caches)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_gbps(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """The ceiling: a device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), device, repeats) / GB


def _paged(device, dtype, kv_heads, head_dim, tokens_per_seq, batch, block_size=16, seed=0):
    """K/V caches holding `batch` sequences of `tokens_per_seq` tokens in shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-tokens_per_seq // block_size)
    num_blocks = per_seq * batch
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    tables = torch.randperm(num_blocks, generator=gen).view(batch, per_seq).to(device, torch.int32)
    return k_cache, v_cache, tables


def decode_attention_gbps(device, dtype, kv_heads, group, head_dim, batch=64, context=2048, repeats=20) -> float:
    """One decode step's attention over `batch` sequences of `context` tokens: K/V bytes read per second."""
    from kernels import triton_attention

    k_cache, v_cache, tables = _paged(device, dtype, kv_heads, head_dim, context, batch)
    query = torch.randn(batch, kv_heads * group, head_dim).to(device, dtype)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    seconds = median_seconds(lambda: triton_attention.decode_attention(query, k_cache, v_cache, tables, seq_lens, scale), device, repeats)
    kv_bytes = 2 * batch * context * kv_heads * head_dim * k_cache.element_size()
    return kv_bytes / seconds / GB


def store_kv_gbps(device, dtype, kv_heads, head_dim, tokens=16384, repeats=20) -> float:
    """Writing `tokens` tokens' K and V into their cache slots: bytes read + written per second."""
    from kernels import triton_attention

    k_cache, v_cache, _ = _paged(device, dtype, kv_heads, head_dim, tokens, 1)
    key = torch.randn(tokens, kv_heads, head_dim).to(device, dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(k_cache.shape[0] * k_cache.shape[1])[:tokens].to(device)
    seconds = median_seconds(lambda: triton_attention.store_kv(key, value, k_cache, v_cache, slots), device, repeats)
    return 2 * 2 * key.numel() * key.element_size() / seconds / GB


# --- the steps --------------------------------------------------------------------------------------


def run_tests(env: dict) -> dict:
    """The CUDA-path tests; the pytest summary line and the skip reasons."""
    # A GPU machine has the cores to spread the tests: pytest-xdist, where it is installed.
    spread = ["-n", str(min(8, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *spread, *TESTS], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    skips = sorted({re.sub(r"^SKIPPED \[\d+\] [^:]+:\d+: ", "", line) for line in lines if line.startswith("SKIPPED")})
    if proc.returncode:
        print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
    return {"ok": proc.returncode == 0, "summary": summary.strip("= "), "skipped": skips}


def run_bandwidth(device: torch.device) -> dict:
    ceiling = copy_gbps(device)
    rows = []
    for name, kv_heads, group, head_dim in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            dname = str(dtype).removeprefix("torch.")
            for kernel, gbps in (("decode attention", decode_attention_gbps(device, dtype, kv_heads, group, head_dim)),
                                 ("KV write", store_kv_gbps(device, dtype, kv_heads, head_dim))):  # fmt: skip
                rows.append({"kernel": kernel, "shape": name, "dtype": dname, "gbps": gbps, "of_copy": gbps / ceiling})
    return {"copy_gbps": ceiling, "rows": rows}


def run_transfer(env: dict, gpus: int) -> dict:
    backends = ["grpc", "nccl"] if gpus >= 2 else ["grpc"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kv.json"
        cmd = [sys.executable, "-m", "benchmarks.kv_transfer", "--device", "cuda", "--backends", *backends, "--tokens", "256", "4096",
               "--dtype", "bfloat16", "--json", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode or not out.exists():
            return {"ok": False, "error": (proc.stderr or proc.stdout)[-2000:], "backends": backends}
        report = json.loads(out.read_text())
    skipped = [] if gpus >= 2 else ["nccl: NCCL pairs two GPUs (one per rank); this machine has one"]
    return {"ok": True, "backends": backends, "skipped": skipped, **report}


# --- the results file -------------------------------------------------------------------------------


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the section for `name` (between its markers) replaced by `body`, or appended."""
    begin, end = f"<!-- gpu-check:{name} -->", f"<!-- /gpu-check:{name} -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def render(gpu: str, facts: dict, tests: dict | None, bandwidth: dict, transfer: dict | None) -> str:
    lines = [f"### GPU check: {gpu}", "", f"`make gpu-check` at {facts['commit']}, {facts['date']}: {facts['gpus']} GPU(s), "
             f"torch {facts['torch']} (CUDA {facts['cuda']}), driver {facts['driver']}, {facts['python']}.", ""]  # fmt: skip
    if tests is not None:
        lines += [f"Tests ({', '.join(TESTS)}): **{'passed' if tests['ok'] else 'FAILED'}**: {tests['summary']}"]
        lines += [f"- skipped: {reason}" for reason in tests["skipped"]] + [""]
    lines += [f"Memory-bound kernels against this card's device-to-device copy ({bandwidth['copy_gbps']:.0f} GB/s read + written):", "",
              "| kernel | KV layout | dtype | GB/s | of copy |", "|---|---|---|---:|---:|"]  # fmt: skip
    lines += [f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['gbps']:.0f} | {r['of_copy']:.0%} |" for r in bandwidth["rows"]]
    if transfer is not None:
        lines += ["", "KV transfer between GPU pools (`pdserve bench kv-transfer --device cuda`, 30 layers x 3 KV heads x 64, bfloat16):", ""]
        if not transfer["ok"]:
            lines += [f"**FAILED** ({', '.join(transfer['backends'])}):", "", "```", transfer["error"].strip(), "```"]
        else:
            memcpy = transfer["ceilings"]["memcpy_gbps"]
            lines += ["| backend | tokens | p50 ms | GB/s | of the pool's copy |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['backend']} | {r['tokens']} | {r['p50_ms']:.2f} | {r['gbps']:.2f} | {r['gbps'] / memcpy:.1%} |"
                      for r in transfer["results"]]  # fmt: skip
            lines += [f"- skipped: {reason}" for reason in transfer["skipped"]]
    return "\n".join(lines)


def facts() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # A copy of the tree whose .git is missing or stale (a lent GPU machine) names its commit in PDSERVE_COMMIT.
    commit = os.environ.get("PDSERVE_COMMIT") or git("rev-parse", "--short", "HEAD") or "unknown commit"
    commit += "-dirty" if "PDSERVE_COMMIT" not in os.environ and git("status", "--porcelain", "--untracked-files=no") else ""
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.split("\n")[0].strip() if _has_nvidia_smi() else "unknown"  # fmt: skip
    return {"commit": commit, "date": time.strftime("%Y-%m-%d"), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "driver": driver, "python": f"Python {platform.python_version()}"}  # fmt: skip


def _has_nvidia_smi() -> bool:
    return any(Path(p, "nvidia-smi").exists() for p in os.environ.get("PATH", "").split(os.pathsep))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="the file to write the section into")
    parser.add_argument("--skip-tests", action="store_true", help="only the measurements")
    parser.add_argument("--skip-transfer", action="store_true", help="no KV-transfer benchmark")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU.format(torch=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    # ROOT first, and whatever the caller put on the path kept (packages installed with --target).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)  # the kernels compiled, not interpreted
    print(f"gpu-check on {gpu}", flush=True)
    tests = None if args.skip_tests else run_tests(env)
    bandwidth = run_bandwidth(torch.device("cuda"))
    transfer = None if args.skip_transfer else run_transfer(env, torch.cuda.device_count())
    body = render(gpu, facts(), tests, bandwidth, transfer)
    results = Path(args.results)
    results.write_text(replace_section(results.read_text() if results.exists() else "", gpu, body))
    print(body, f"\nwritten to {results}", sep="\n")
    return 0 if (tests is None or tests["ok"]) and (transfer is None or transfer["ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())

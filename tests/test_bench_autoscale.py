"""`pdserve bench autoscale` end to end on a short trace: every --compare mode (static-min,
static-max, both planner policies, each beside its simulator twin) starts its own mock cluster,
replays the same frozen arrivals and writes a valid run report; one run against a cluster that
is already running writes one too. Behaviour, not speed: the numbers are not asserted."""

import json

import pytest

from benchmarks import autoscale, run_report, tables
from cluster.cluster import Cluster
from cluster.config import ServeConfig
from engine.config import EngineConfig
from engine.cost_model import CostProfile, Grid, KVSpec, Link

PROFILE = CostProfile(
    name="bench-test", source="derived", model="test-model", hardware="none", kv=KVSpec(8, 2, 32, "bfloat16"),
    prefill=Grid((16, 1024), (0, 4096), ((0.010, 0.010), (0.100, 0.100))),
    decode=Grid((1, 64), (16, 16384), ((0.010, 0.010), (0.050, 0.050))),
    step_overhead_seconds=0.0, startup_seconds=0.0, transfer={"grpc": Link(0.001, 1e9), "nccl": Link(0.001, 1e9)},
    kv_capacity_tokens=8192,
)  # fmt: skip
WORKLOAD = ["--pattern", "step", "--params", "low=1", "high=4", "start=1", "end=3", "--duration", "5", "--input-len", "64",
            "--output-len", "8", "--length-sigma", "0.3"]  # fmt: skip
TIMELINE = {"t", "offered_rate", "finished", "pools", "targets", "ttft_ms", "itl_ms", "slo_attainment", "queued_prompt_tokens",
            "kv_usage"}  # fmt: skip
SUMMARY = {"requests", "ok", "rejected", "timeout", "failed", "duration_s", "slo_attainment", "goodput_rps", "throughput_rps",
           "worker_seconds", "goodput_per_worker_second", "ttft_ms", "itl_ms", "itl_mean_ms", "e2e_ms"}  # fmt: skip


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("profiles") / "bench-test.json"
    PROFILE.save(path)
    return str(path)


def check(report: dict, kind: str, requests: int | None = None) -> None:
    """A run report with the documented fields, that round-trips through JSON."""
    report = json.loads(json.dumps(report))
    assert report["schema"] == "pdserve.run" and report["version"] == 1 and report["kind"] == kind
    assert SUMMARY <= set(report["summary"]) and report["summary"]["requests"] > 0
    assert report["summary"]["worker_seconds"] > 0
    if requests is not None:
        assert report["summary"]["requests"] == requests
    assert report["timeline"] and all(TIMELINE <= set(row) for row in report["timeline"])
    assert len(report["requests"]) == report["summary"]["requests"]
    assert {"ttft_ms", "itl_ms"} == set(report["config"]["slo"])


def test_every_compare_mode_runs_end_to_end_and_writes_a_report(profile_file, tmp_path, published_table):
    out = tmp_path / "runs"
    reports = autoscale.main(["--compare", "--with-sim", "--profile", profile_file, "--min-prefill", "1", "--max-prefill", "2",
                              "--min-decode", "1", "--max-decode", "2", "--planner-interval", "1", "--slo-ttft-ms", "500",
                              "--slo-itl-ms", "100", "--serve-args", "--kv-cache-gb 0.01 --max-model-len 512", "--out-dir", str(out),
                              "--json", str(out / "summary.json"), "--disable-tqdm", *WORKLOAD])  # fmt: skip
    modes = ["static-min", "static-max", "slo", "predictive"]
    assert list(reports) == [m + suffix for m in modes for suffix in ("", " (sim)")]
    arrivals = sum(1 for _ in open(out / "workload.jsonl"))
    for mode in modes:
        mock, sim = run_report.load(out / f"{mode}.json"), run_report.load(out / f"{mode}.sim.json")
        check(mock, "mock", arrivals)
        check(sim, "sim", arrivals)
        assert mock["summary"]["ok"] == arrivals  # a light load: nothing refused
        policy = None if mode.startswith("static") else mode
        assert mock["config"]["policy"] == policy and sim["config"]["policy"] == policy
        if policy:
            assert mock["decisions"] and all(d["reason"] for d in mock["decisions"])
    pools = {m: run_report.load(out / f"{m}.json")["config"]["pools"] for m in modes}
    assert pools["static-min"] == pools["slo"] == {"prefill": 1, "decode": 1} and pools["static-max"] == {"prefill": 2, "decode": 2}
    assert (out / "compare.png").stat().st_size > 0
    table = published_table("autoscale-day", {f"autoscale-{p}.json": out / "summary.json" for p in tables.AUTOSCALE_POLICIES})
    assert "| static-max 2P/2D, mock | " in table and "| `predictive` (from 1P/1D), simulator | " in table
    static_max = next(line for line in table.splitlines() if line.startswith("| static-max 2P/2D, mock"))
    assert "(100%)" in static_max and f"{arrivals}/{arrivals}" in static_max


def test_growth_times_a_new_worker_of_each_pool(profile_file, tmp_path, published_table):
    """--growth: one more prefill and one more decode worker of a mock cluster, timed from the
    resize to ready and to its first step of served work."""
    out = tmp_path / "growth"
    result = autoscale.main(["--growth", "--profile", profile_file, "--startup-seconds", "0", "--repeat", "1",
                             "--serve-args", "--kv-cache-gb 0.01 --max-model-len 512", "--out-dir", str(out)])  # fmt: skip
    runs = result["growth"]
    assert [r["role"] for r in runs] == ["prefill", "decode"]
    assert all(0 < r["ready_s"] <= r["first_served_s"] and r["profile_startup_s"] == 0 for r in runs)
    table = published_table("autoscale-growth", {f"autoscale-growth-{n}.json": out / "growth.json" for n in ("0s", "profile")})
    assert table.count("| 0 s | prefill |") == 2 and table.count("| 0 s | decode |") == 2


def test_a_response_of_several_tokens_counts_as_that_many_gaps():
    itl = {"t": [], "value": [], "count": []}
    autoscale.add_gaps(itl, 1.0, [0.1, 0.3], [1, 3])
    assert itl["t"] == pytest.approx([1.1, 1.4]) and itl["value"] == pytest.approx([0.1, 0.1]) and itl["count"] == [1, 3]
    assert autoscale.streamed(itl["count"]) == {"responses": 2, "tokens": 4, "joined_share": 0.75}


def test_a_run_against_a_running_cluster_writes_its_report(ray_local, profile_file, tmp_path):
    engine = EngineConfig(engine=f"mock:{profile_file}", kv_cache_gb=0.01, max_model_len=512)
    cluster = Cluster(ServeConfig(engine=engine, port=0)).start()
    try:
        out = tmp_path / "run.json"
        result = autoscale.main(["--target", cluster.target, "--out", str(out), "--disable-tqdm", *WORKLOAD])
    finally:
        cluster.stop()
    report = run_report.load(out)
    assert list(result) == [str(out)] and result[str(out)]["summary"] == report["summary"]
    check(report, "mock")
    streamed = report["harness"]["streamed"]  # every token but a request's first came after a gap
    assert streamed["responses"] <= streamed["tokens"] <= sum(r["output_len"] - 1 for r in report["requests"] if r["status"] == "ok")
    assert report["config"]["pools"] == {"prefill": 1, "decode": 1} and report["config"]["mode"] == "disaggregated"
    assert (tmp_path / "run.png").stat().st_size > 0

"""Issue 10's small validation case: a mock-engine cluster (the real router, Ray actors, gRPC and
KV transfers; model steps timed by a profile) and the simulator replay the same frozen arrivals on
the same profile, pools and KV pool, and agree on TTFT, ITL and throughput. The bench
(`pdserve bench sim-validate`) holds them to 10%; this test to a looser bound, since a test
shares this machine with whatever else runs (see BOUNDS). The same comparison against the
simulator on a profile twice as fast must fail it: the bound can tell a wrong cost model."""

import argparse

import pytest

from benchmarks import autoscale, sim_validate as sv, workload as wl
from cluster.cli import fetch_state
from cluster.cluster import Cluster
from cluster.config import ServeConfig
from engine.config import EngineConfig
from engine.cost_model import CostProfile, Grid, KVSpec, Link
from gpus import placement

# Decode steps of 60-110 ms and prompts of 150-700 ms: the cluster's own costs that the profile
# leaves out (the router's work per streamed token, its Ray calls and gRPC per request: a few ms
# and a few tens of ms on a loaded 2-core machine) stay small against them.
PROFILE = CostProfile(
    name="validation-test", source="derived", model="test-model", hardware="none", kv=KVSpec(4, 1, 32, "float32"),
    prefill=Grid((16, 512), (0, 1024), ((0.150, 0.170), (0.600, 0.700))),
    decode=Grid((1, 16), (16, 1024), ((0.060, 0.065), (0.090, 0.110))),
    step_overhead_seconds=0.050, startup_seconds=0.0, transfer={"grpc": Link(0.002, 5e8), "nccl": Link(0.002, 5e8)},
    kv_capacity_tokens=16384,
)  # fmt: skip
# Poisson arrivals at 2 requests/s for 12 s: prompts ~160 tokens (each behind one of two
# shared 64-token prefixes), ~24 new tokens each, so batches form and prefixes hit.
WORKLOAD = wl.Workload("constant", 12.0, {"rate": 2.0}, (wl.Mix(1.0, wl.Lengths(160, 0.3, 32, 400), wl.Lengths(24, 0.3, 4, 64),
                                                                  prefixes=2, prefix_len=64),), seed=3)  # fmt: skip
# Measured here (sim against mock, load average ~5 on 2 cores): TTFT p50 -9%, ITL p50 -2%, output
# tokens/s +0.2%. What the simulator leaves out is the cluster's own latency: ~20-25 ms a request
# of Ray calls (reservation, prefill), the decode worker's long poll and gRPC, and ~1.5 ms a token
# of late wake-ups and streaming. Those grow with the machine's load, and a p50 of ~24 requests
# moves with it, so the bounds are 4x and 10x what was measured; a cost model off by 2x still
# lands far outside them (the last assertion).
BOUNDS = {"ttft_p50": 0.35, "itl_p50": 0.35, "output_tokens_per_s": 0.20}


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("profiles") / "validation-test.json"
    PROFILE.save(path)
    return str(path)


def test_a_mock_cluster_and_the_simulator_agree_on_the_same_arrivals(ray_local, profile_file, tmp_path):
    trace = str(tmp_path / "arrivals.jsonl")
    n = wl.write_jsonl(WORKLOAD.requests(), trace)
    engine = EngineConfig(engine=f"mock:{profile_file}", max_model_len=1024)
    cluster = Cluster(ServeConfig(engine=engine, port=0, prefill=1, decode=1, **placement(2, "nccl"))).start()
    try:
        kv_blocks = min(w["kv_blocks"]["total"] for w in fetch_state(cluster.target)["workers"])
        hops = sv.measure_hops(cluster.target)  # the cluster's control-message latency, given to its twin
        report = autoscale.run_against(cluster.target, wl.Trace(trace), sv.replay_args(0), {"slo": {"ttft_ms": 5000, "itl_ms": 500}},
                                       "mock")  # fmt: skip
    finally:
        cluster.stop()
    assert report["kind"] == "mock" and report["summary"]["ok"] == report["summary"]["requests"] == n
    args = argparse.Namespace(out_dir=str(tmp_path), slo_ttft_ms=5000, slo_itl_ms=500)
    assert 0 < hops["client"] < 1000 and 0 <= hops["worker"] < 1000, hops
    sim = sv.sim_run("twin", {"prefill": 1, "decode": 1}, profile_file, trace, kv_blocks, hops, args)
    assert sim["summary"]["ok"] == n
    mock, twin = sv.metrics(report), sv.metrics(sim)
    errs = sv.errors(mock, twin)
    print({k: f"mock {mock[k]:.1f} sim {twin[k]:.1f} ({errs[k]:+.1%})" for k in sv.METRICS})
    assert all(abs(errs[k]) <= bound for k, bound in BOUNDS.items()), errs

    # A simulator whose cost model ran twice too fast is caught by the same bounds.
    fast = autoscale.slowed_profile(profile_file, 0.5, str(tmp_path))
    wrong = sv.errors(mock, sv.metrics(sv.sim_run("wrong", {"prefill": 1, "decode": 1}, fast, trace, kv_blocks, hops, args)))
    assert abs(wrong["ttft_p50"]) > BOUNDS["ttft_p50"] and abs(wrong["itl_p50"]) > BOUNDS["itl_p50"], wrong

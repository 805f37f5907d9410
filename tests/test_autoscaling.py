"""The planner on a live mock cluster: a step load (low, 5x, low) replayed by `bench autoscale`'s
harness grows the prefill and the decode pool and shrinks them back; every request completes and
every worker ends with no KV block in use. Status and metrics show the planner's targets and
decisions; a manual resize pins a pool."""

import argparse
import time
import urllib.request

import grpc
import pytest
import ray

from benchmarks import autoscale, run_report
from benchmarks import workload as wl
from cluster import cli
from cluster.cluster import Cluster
from cluster.config import ServeConfig
from cluster.planner import PlannerConfig
from engine.config import EngineConfig
from engine.cost_model import CostProfile, Grid, KVSpec, Link
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

# Slow enough that this machine's own overheads (~0.1 s of TTFT) stay small beside it: a 256-token
# prompt takes 0.18 s; a decode step 20 ms + 8 ms per sequence.
PROFILE = CostProfile(
    name="step-test", source="derived", model="test-model", hardware="none", kv=KVSpec(8, 2, 32, "bfloat16"),
    prefill=Grid((16, 1024), (0, 4096), ((0.038, 0.038), (0.530, 0.530))),
    decode=Grid((1, 64), (16, 16384), ((0.028, 0.028), (0.532, 0.532))),
    step_overhead_seconds=0.0, startup_seconds=0.0, transfer={"grpc": Link(0.001, 1e9), "nccl": Link(0.001, 1e9)},
)  # fmt: skip
STEP = wl.Workload("step", 50.0, {"low": 1.0, "high": 5.0, "start": 7.0, "end": 25.0},
                   (wl.Mix(1.0, wl.Lengths(256), wl.Lengths(48)),), seed=3)  # fmt: skip
PLANNER = PlannerConfig(policy="slo", min_prefill=1, max_prefill=3, min_decode=1, max_decode=3, slo_ttft_ms=600, slo_itl_ms=100,
                        interval=2.0, up_cooldown=2.0, down_cooldown=8.0, max_step=2)  # fmt: skip


def harness_args(**kw) -> argparse.Namespace:
    defaults = dict(seed=0, dataset="synthetic", disable_tqdm=True, poll=1.0, request_timeout=300.0, step=1.0)
    return argparse.Namespace(**{**defaults, **kw})


@pytest.fixture(scope="module")
def autoscaled(ray_local, tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "step-test.json"
    PROFILE.save(path)
    engine = EngineConfig(engine=f"mock:{path}", kv_cache_gb=0.02, max_model_len=1024)
    config = ServeConfig(engine=engine, port=0, metrics_port=0, max_prefill=3, max_decode=3, autoscale=PLANNER)
    cluster = Cluster(config).start()
    yield cluster
    cluster.stop()


def state(target: str) -> dict:
    return cli.fetch_state(target)


def test_a_step_load_grows_both_pools_and_shrinks_them_back_with_nothing_lost(autoscaled):
    config = {"slo": {"ttft_ms": PLANNER.slo_ttft_ms, "itl_ms": PLANNER.slo_itl_ms}}
    report = autoscale.run_against(autoscaled.target, STEP, harness_args(), config, "mock")
    s = report["summary"]
    print(run_report.table({"step": report}))
    for d in report["decisions"]:
        if d["direction"] != "hold":
            print(f"{d['at']:7.1f}s {d['role']:8} {d['current']} -> {d['target']} {d['reason']}: {d['detail']}")
    assert s["requests"] == s["ok"] > 0 and s["failed"] == s["rejected"] == s["timeout"] == 0
    assert report["kind"] == "mock" and report["config"]["policy"] == "slo"
    for role in ("prefill", "decode"):
        ups = [d for d in report["decisions"] if d["role"] == role and d["direction"] == "up"]
        assert ups, f"the {role} pool never grew"
        assert max(row["pools"].get(role, 0) for row in report["timeline"]) > 1
    # the load has left: both pools go back to one worker (the planner's shrink waits for its cooldown)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        sizes = {role: sum(w["role"] == role for w in state(autoscaled.target)["workers"]) for role in ("prefill", "decode")}
        if sizes == {"prefill": 1, "decode": 1}:
            break
        time.sleep(1.0)
    assert sizes == {"prefill": 1, "decode": 1}
    downs = {d["role"] for d in state(autoscaled.target)["planner"]["decisions"] if d["direction"] == "down"}
    assert downs == {"prefill", "decode"}
    stats = ray.get([w.handle.stats.remote() for w in autoscaled.router.workers.values()], timeout=60)
    assert [s["kv_blocks"]["in_use"] for s in stats] == [0, 0] and not any(s["running"] + s["waiting"] for s in stats)


def test_status_and_metrics_show_the_planner_and_a_manual_resize_pins_a_pool(autoscaled):
    planner = state(autoscaled.target)["planner"]
    assert planner["policy"] == "slo" and planner["bounds"] == {"prefill": [1, 3], "decode": [1, 3]}
    assert planner["rounds"] >= 1 and set(planner["targets"]) == {"prefill", "decode"}
    assert all(d["reason"] and d["detail"] for d in planner["decisions"])
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{autoscaled.metrics_port}/metrics", timeout=30).read().decode()
    assert 'pdserve_planner_target_workers{role="prefill"}' in metrics
    assert "pdserve_planner_decisions_total{" in metrics and 'reason="steady"' in metrics

    def scale(**fields):
        with grpc.insecure_channel(autoscaled.target) as channel:
            return cli.state_to_dict(pb_grpc.AdminStub(channel).Scale(pb.ScaleRequest(**fields), timeout=120))

    pinned = scale(decode=2)
    assert pinned["planner"]["bounds"]["decode"] == [2, 2]
    assert sum(w["role"] == "decode" and w["state"] == "ready" for w in pinned["workers"]) == 2
    time.sleep(3 * PLANNER.interval)  # idle, yet the planner holds the pinned pool
    assert sum(w["role"] == "decode" for w in state(autoscaled.target)["workers"]) == 2
    for refused in (dict(max_decode=9), dict(decode=3, max_decode=3), dict(min_prefill=1, max_prefill=2, min_decode=3, max_decode=2)):
        with pytest.raises(grpc.RpcError) as e:  # beyond the cluster's --max-decode; a pin and bounds at once; low > high
            scale(**refused)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused
    assert state(autoscaled.target)["planner"]["bounds"] == {"prefill": [1, 3], "decode": [2, 2]}  # all refused whole
    released = scale(min_decode=1, max_decode=3)
    assert released["planner"]["bounds"]["decode"] == [1, 3]

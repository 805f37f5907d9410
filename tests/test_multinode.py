"""pdserve on a real multi-node Ray (several raylets on this machine), losing whole nodes.

The cluster runs in a driver process of its own (tests/multinode_driver.py: its docstring has the
nodes and the scenario), since this process's Ray is the session's local one; the driver records
what it saw and the tests here judge it: placement against Ray's own per-node accounting, KV
crossing nodes on both backends with transformers' greedy tokens, requests moving off a killed
node, and a pool reported short while no node offers its resource.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from oracle import assert_matches_oracle, hf_greedy

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 40  # the longest any request of the scenario asks for


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, default_model_dir):
    out = tmp_path_factory.mktemp("multinode") / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "RAY_AUTH_MODE": "token"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_driver.py"), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=3000)  # fmt: skip
    report = json.loads(out.read_text()) if out.exists() else {}
    assert report.get("ok"), f"the driver failed (rc {proc.returncode}):\n{report.get('error')}\n{proc.stderr[-4000:]}"
    return report


@pytest.fixture(scope="module")
def expected(scenario, hf_default_model):
    return [hf_greedy(hf_default_model, p, MAX_TOKENS) for p in scenario["prompts"]]


def assert_token_exact(hf_model, prompts, results, expected):
    for prompt, result, want in zip(prompts, results, expected):
        assert result["code"] == "OK", result
        assert_matches_oracle(hf_model, prompt, result["tokens"], want[: len(result["tokens"])])
        assert len(result["tokens"]) in (16, MAX_TOKENS, 4)


def workers(snap, role):
    return [w for w in snap["status"]["workers"] if w["role"] == role]


def assert_placed_by_ray(snap, role, node_ids):
    """The worker is where Ray says its actor is, on a node offering its pool's resource, which
    the worker holds there (that node has none of it left)."""
    (worker,) = [w for w in workers(snap, role) if w["state"] == "ready"]
    actor = next(a for name, a in snap["ray"]["actors"].items() if name.endswith("-" + worker["id"]))
    node = snap["ray"]["nodes"][actor["node_id"]]
    assert worker["node_id"] == actor["node_id"] and worker["pid"] == actor["pid"] > 0
    assert worker["node_id"] in node_ids and worker["node_address"] == node["address"] == "127.0.0.2"
    assert node["offers"][role] == 1 and node["available"][role] == 0
    return worker


@pytest.mark.parametrize("transfer", ["grpc", "nccl"])
def test_workers_land_on_the_nodes_offering_their_pool(scenario, transfer):
    ids = scenario["node_ids"]
    snap = scenario["runs"][transfer]["placed"]
    assert snap["status"]["transfer"] == transfer and snap["health"] == "SERVING"
    prefill = assert_placed_by_ray(snap, "prefill", {ids["head"]})
    decode = assert_placed_by_ray(snap, "decode", {ids["B"], ids["C"]})
    assert prefill["node_id"] != decode["node_id"]


@pytest.mark.parametrize("transfer", ["grpc", "nccl"])
def test_kv_crosses_nodes_with_transformers_tokens(scenario, transfer, expected, hf_default_model):
    run = scenario["runs"][transfer]
    assert_token_exact(hf_default_model, scenario["prompts"], run["results"], expected)
    assert all(w["kv_blocks"]["in_use"] == 0 for w in run["after"]["status"]["workers"])


def test_a_lost_node_s_requests_move_to_a_replacement_on_another_node(scenario, expected, hf_default_model):
    loss, ids = scenario["node_loss"], scenario["node_ids"]
    first, replaced = loss["first"]["worker"], loss["replaced"]["worker"]
    moved = loss["moved"]
    assert first["pid"] in moved["killed_pids"]  # the worker process died with its node
    assert all(n >= 2 for n in moved["tokens_before_kill"])  # every request was mid-stream
    assert_token_exact(hf_default_model, scenario["prompts"], moved["results"], expected)
    print(f"kill -> next token per stream (s): {[round(t, 2) for t in moved['next_token_after_kill_s']]}")
    survivor = {ids["B"], ids["C"]} - {first["node_id"]}
    assert replaced["node_id"] in survivor and assert_placed_by_ray(loss["replaced"], "decode", survivor)
    assert first["node_id"] not in loss["replaced"]["ray"]["nodes"]  # Ray too sees the node gone
    assert loss["replaced"]["status"]["pools"]["decode"] == {"target": 1, "ready": 1}


def test_a_pool_no_node_can_host_is_reported_short_until_a_node_joins(scenario, expected, hf_default_model):
    loss = scenario["node_loss"]
    short = loss["short"]
    assert short["status"]["pools"]["decode"] == {"target": 1, "ready": 0}
    assert short["health"] == "NOT_SERVING" and short["decode_pool_health"] == "NOT_SERVING"
    assert "decode pool short: 0 of 1 ready" in short["table"]
    assert not any(n["offers"]["decode"] for n in short["ray"]["nodes"].values())
    restored = loss["restored"]
    assert restored["worker"]["node_id"] == loss["node_ids"]["D"] and restored["health"] == restored["decode_pool_health"] == "SERVING"
    assert restored["status"]["pools"]["decode"] == {"target": 1, "ready": 1}
    prompts = scenario["prompts"]
    # the request that arrived while the pool was short waited for it, and was served
    assert_token_exact(hf_default_model, prompts[:1] + prompts, [short["waited"]] + restored["results"], expected[:1] + expected)


def test_status_shows_each_worker_s_node_and_process(scenario):
    for w in scenario["node_loss"]["replaced"]["status"]["workers"]:
        assert len(w["node_id"]) == 56 and w["node_address"] == "127.0.0.2" and w["pid"] > 0
    table = scenario["node_loss"]["short"]["table"]
    prefill = workers(scenario["node_loss"]["short"], "prefill")[0]
    assert f"{prefill['pid']}" in table and prefill["node_id"][:16] in table and "127.0.0.2" in table

"""deploy/cluster.yaml is a valid `ray up` config (Ray's own schema) with the pools pdserve needs."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "cluster.yaml"


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load(CONFIG.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_prefill_and_decode_pools_are_separate_gpu_node_types():
    types = yaml.safe_load(CONFIG.read_text())["available_node_types"]
    by_pool = {pool: [t for t in types.values() if t["resources"].get(pool)] for pool in ("prefill", "decode")}
    for pool, node_types in by_pool.items():
        assert len(node_types) == 1, pool
        assert node_types[0]["resources"].get("GPU", 0) >= 1 and node_types[0]["max_workers"] > node_types[0]["min_workers"]
    assert by_pool["prefill"][0] is not by_pool["decode"][0]


def test_ray_token_auth_is_on_everywhere_and_the_dashboard_is_local():
    config = yaml.safe_load(CONFIG.read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c.split("ray start")[0] for c in starts), starts
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head
    # every node gets the same token, drivers on the nodes use it too
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])
    assert "0.0.0.0" not in CONFIG.read_text() and "--dashboard-host=::" not in CONFIG.read_text()


def test_the_nodes_get_the_code_not_this_machines_venv_and_a_stopped_job_has_time_to_drain():
    config = yaml.safe_load(CONFIG.read_text())
    assert {"**/.venv", "**/.git"} <= set(config["rsync_exclude"]) and config["rsync_filter"] == [".gitignore"]
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert int(head.split("RAY_JOB_STOP_WAIT_TIME_S=")[1].split()[0]) > 30  # pdserve's default --shutdown-grace


def test_the_documented_serve_commands_ask_ray_to_launch_the_pool_nodes():
    """A `ray up` cluster starts as the head alone: without --nodes-on-demand no live node offers
    'prefill' or 'decode', so the workers would not ask for them and would run on the head's CPU."""
    commands = [line for line in (CONFIG.parent / "README.md").read_text().splitlines() if "pdserve serve --address" in line]
    assert commands and all("--nodes-on-demand" in line for line in commands), commands

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

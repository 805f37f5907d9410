"""Pools far too small for the load: decode workers preempt and recompute, and every request
still gets exactly its tokens, with no block left in use."""

import dataclasses

import pytest
from test_cluster import (
    CHATS, ENGINE, RAW, assert_invariants, assert_same_as_engine, cluster_state, engine_reference, start_cluster, stream_all,
    wait_all_free,
)  # fmt: skip

from protos import generation_pb2 as pb

SMALL = dataclasses.replace(ENGINE, kv_cache_gb=None, num_kv_blocks=24, max_model_len=256)  # 384 tokens per worker
REQUESTS = [pb.GenerateRequest(prompt=t, sampling=pb.SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
            for t in CHATS + RAW]  # fmt: skip  # 16 generations needing ~75 blocks at once


@pytest.fixture(scope="module")
def reference(default_llm):
    return engine_reference(default_llm, REQUESTS)


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def small_cluster(request, ray_local):
    pools = {"prefill": 1, "decode": 1, "transfer": "grpc"} if request.param == "disaggregated" else {"colocated": 1}
    cluster = start_cluster(SMALL, **pools)
    yield cluster
    cluster.stop()


def test_16_long_generations_through_a_small_pool(small_cluster, reference):
    results = stream_all(small_cluster.target, REQUESTS)
    assert_same_as_engine(results, reference)
    generating = [w for w in cluster_state(small_cluster.target).workers if w.role in ("decode", "colocated")]
    assert sum(w.preemptions for w in generating) > 0
    wait_all_free(small_cluster.target)
    assert_invariants(small_cluster)

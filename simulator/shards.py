"""A big cluster simulated by one of its shards: `pdserve sim --shards S`.

One request costs the simulator ~0.6 ms at 512 workers (the router's policies look at every
worker of a pool), so an hour of a 512-GPU cluster at the request rate it can serve (~25,000
requests/s, ~90 M requests) would take about 15 hours. Behind one router, N workers per
pool fed R requests/s behave nearly like S copies of N/S workers each fed R/S. So the simulator
runs one such shard: its pools (and the planner's bounds) divided by S, and each request kept at
random with probability 1/S (for a pattern workload, the same law as its rate divided by S). The
cluster's counts (requests, throughput, worker-seconds, pool sizes, the planner's targets, the
admission queue) are the shard's times S; latencies and SLO attainment are the shard's own, and
so are the planner's reason details and the run's sim_stats.

What it gives up:
- the router picks among N/S workers instead of N: a smaller pool smooths bursts less, so a shard
  queues a little more than the whole cluster; and a skew that grows with the cluster (as the
  colocated herding fixed in 1c49f61 did, docs/autoscaling.md) shrinks with the shard;
- each shard's prefill workers warm every shared prefix for themselves;
- the pools move in whole shards: S workers at a time, the planner's max_step divided by S (at
  least one shard worker), its bounds rounded to multiples of S.
`pdserve bench sim-scale` measures the difference against the whole cluster on one load.
"""

from __future__ import annotations

import dataclasses
import random

from benchmarks.workload import Workload
from cluster.planner import ROLES
from simulator.config import SimConfig


def shard_config(config: SimConfig, shards: int) -> SimConfig:
    """One shard of `config`'s cluster: every pool divided by `shards`, which must divide it, and
    the router's admission queue too (the cluster has one router: one queue for all the shards)."""
    if shards < 1:
        raise ValueError("--shards must be >= 1")
    uneven = {role: n for role, n in config.pools.items() if n % shards}
    if uneven:
        raise ValueError(f"--shards {shards} must divide every pool; it does not divide {uneven}")
    # (rounded up: a queue of 0 would mean none, refusing at once)
    return dataclasses.replace(config, max_waiting_requests=-(-config.max_waiting_requests // shards),
                               **{role: getattr(config, role) // shards for role in ROLES})  # fmt: skip


def cluster_bounds(planner_config, shards: int, roles):
    """The bounds a sharded run really holds the cluster to: for each of `roles`, the minimum
    rounded up and the maximum rounded down to multiples of `shards` (at least one shard worker)."""
    changes = {}
    for role in roles:
        low, high = getattr(planner_config, f"min_{role}"), getattr(planner_config, f"max_{role}")
        changes[f"min_{role}"] = max(1, -(-low // shards)) * shards
        changes[f"max_{role}"] = high // shards * shards
        if changes[f"max_{role}"] < changes[f"min_{role}"]:
            raise ValueError(f"--max-{role} {high} leaves no room in a shard of 1/{shards}: give multiples of --shards")
    return dataclasses.replace(planner_config, **changes)


def shard_bounds(planner_config, shards: int, roles):
    """A shard's planner config: cluster_bounds divided by `shards`, and max_step too (at least 1)."""
    bounds = cluster_bounds(planner_config, shards, roles)
    changes = {f"{edge}_{role}": getattr(bounds, f"{edge}_{role}") // shards for role in roles for edge in ("min", "max")}
    return dataclasses.replace(bounds, max_step=max(1, planner_config.max_step // shards), **changes)


def sample(workload, shards: int, seed: int = 0):
    """A shard's arrivals: a pattern workload at 1/shards of its rate (the same law as keeping each
    of its requests with probability 1/shards, at the cost of the kept ones only); a trace's requests
    each kept with that probability (seeded: the same shard every run)."""
    if shards == 1:
        return workload.requests()
    if isinstance(workload, Workload):
        return dataclasses.replace(workload, rate_scale=workload.rate_scale / shards).requests()
    keep = random.Random(f"shard-{shards}-{seed}").random
    return (r for r in workload.requests() if keep() * shards < 1)


def scale_up(result, shards: int):
    """A shard's SimResult as its cluster's: worker-seconds, pool sizes, targets, queued prompt
    tokens, the admission queue and the planner's decisions multiplied by `shards` (the requests
    stay the shard's: run reports multiply their counts with `scale`; stats stay the shard's)."""
    if shards == 1:
        return result

    def times(pools: dict) -> dict:
        return {role: n * shards for role, n in pools.items()}

    samples = [{**s, "pools": times(s["pools"]), "targets": times(s["targets"]), "queued_prompt_tokens": s["queued_prompt_tokens"] * shards,
                "admission_queue": s["admission_queue"] * shards} for s in result.samples]  # fmt: skip
    decisions = [{**d, "current": d["current"] * shards, "target": d["target"] * shards} for d in result.decisions]
    return dataclasses.replace(result, samples=samples, decisions=decisions, worker_seconds=result.worker_seconds * shards,
                               stats={**result.stats, "shards": shards}, scale=shards)  # fmt: skip

"""Cluster supervision on fake actors (no Ray): resizes whose starts fail, dead workers, and a stop
while a worker starts. The same paths with real processes: test_fault_tolerance.py, test_multinode.py."""

import asyncio
import dataclasses
import itertools

import pytest

import cluster.cluster as cluster_module
from cluster.cluster import Cluster
from cluster.config import ServeConfig
from engine.config import EngineConfig
from router.router import Router, RouterConfig
from router.workers import Role, WorkerState

HEALTHY = {"alive": True, "step_seconds": 0.0}  # a worker's ping: EngineLoop.health

class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return asyncio.ensure_future(self.fn(*args))


class FakeActor:
    """Ready at once (or never), answers polls and pings, stops when asked."""

    def __init__(self, ready=True):
        self.never_ready = not ready
        for name in ("ready", "get_outputs", "ping", "shutdown", "stats"):
            setattr(self, name, _Method(getattr(self, f"_{name}")))

    async def _ready(self):
        if self.never_ready:
            await asyncio.sleep(3600)
        return {"node": "here", "node_id": "n1", "node_address": "127.0.0.1", "pid": 1, "max_num_seqs": 8,
                "kv_blocks": {"total": 10, "free": 10, "cached": 0}}  # fmt: skip

    async def _get_outputs(self, timeout):
        await asyncio.sleep(timeout)
        return {"outputs": [], "load": {"free_blocks": 10, "running": 0, "serial": 0, **HEALTHY}}

    async def _ping(self):
        return HEALTHY

    async def _shutdown(self):
        return None

    async def _stats(self):
        return {}


@pytest.fixture
def killed(monkeypatch):
    handles = []
    monkeypatch.setattr(cluster_module.ray, "kill", handles.append)
    monkeypatch.setattr(cluster_module, "_REPLACE_DELAY", 0.05)
    return handles


def cluster_on_this_loop(actors) -> Cluster:
    """A Cluster whose router runs on the running loop and whose actors come from `actors(role)`."""
    c = Cluster(ServeConfig(engine=EngineConfig(engine="mock:llama-3.1-8b-h100"), port=0))
    c._loop, c._hurry = asyncio.get_running_loop(), asyncio.Event()
    c.router = Router(None, 16, RouterConfig(), c._workers_changed)
    c._actor = lambda role, worker_id: actors(role)
    return c


async def settle(c: Cluster, ready: dict[Role, int], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while {role: sum(w.state is WorkerState.READY for w in c.router.of_role(role)) for role in ready} != ready or any(
        w.state is not WorkerState.READY for w in c.router.workers.values()
    ):
        assert asyncio.get_running_loop().time() < deadline, {w.id: w.state.value for w in c.router.workers.values()}
        await asyncio.sleep(0.02)


def test_a_resize_whose_start_fails_leaves_nothing_half_done_and_supervision_refills_the_pool(killed):
    """Ray refuses one new actor: the resize still drains the worker it chose and starts the other,
    raises, and supervision starts the missing one, so the pools get their sizes."""
    calls = itertools.count()

    def actors(role):
        if next(calls) == 4:  # the second new decode worker of the second resize
            raise RuntimeError("the GCS did not answer")
        return FakeActor()

    async def scenario():
        c = cluster_on_this_loop(actors)
        await c._scale({"prefill": 2, "decode": 1})
        with pytest.raises(RuntimeError, match="1 of 3 pool changes failed"):
            await c._scale({"prefill": 1, "decode": 3})
        await settle(c, {Role.PREFILL: 1, Role.DECODE: 3})
        assert len(killed) == 1  # the prefill worker drained away
        await c._stop(1.0)

    asyncio.run(scenario())


def test_a_dead_worker_leaves_its_pool_and_a_new_one_takes_its_place(killed):
    async def scenario():
        c = cluster_on_this_loop(lambda role: FakeActor())
        await c._scale({"prefill": 1, "decode": 2})
        dead = c.router.of_role(Role.DECODE)[0]
        c.router._worker_died(dead, RuntimeError("SIGKILL"))
        await settle(c, {Role.PREFILL: 1, Role.DECODE: 2})
        assert dead.id not in c.router.workers and dead.handle in killed
        await c._stop(1.0)

    asyncio.run(scenario())


def test_a_failed_start_is_tried_again_until_the_pool_has_its_size(killed):
    """No node can take the new worker at first (its start times out): the pool stays short, says
    so, and supervision keeps trying; once a start succeeds the pool is whole."""
    starts = itertools.count()

    async def scenario():
        c = cluster_on_this_loop(lambda role: FakeActor(ready=next(starts) >= 3))
        c.config = dataclasses.replace(c.config, startup_timeout=0.1)
        with pytest.raises(RuntimeError, match="not ready within"):
            await c._scale({"prefill": 1, "decode": 1})  # start 0 or 1 fails
        assert c.router.pools()["decode"]["ready"] + c.router.pools()["prefill"]["ready"] < 2
        await settle(c, {Role.PREFILL: 1, Role.DECODE: 1})
        await c._stop(1.0)

    asyncio.run(scenario())


def test_a_stop_while_a_worker_starts_drains_the_others(killed):
    async def scenario():
        c = cluster_on_this_loop(lambda role: FakeActor(ready=role is not Role.DECODE or not c.router.of_role(Role.DECODE)))
        await c._scale({"prefill": 1, "decode": 1})
        c.router.set_target(Role.DECODE, 2)
        starting = c._start_workers(Role.DECODE, 1)  # a replacement that will never be ready
        await asyncio.sleep(0.05)
        await asyncio.wait_for(c._stop(1.0), 10)
        assert not c.router.workers and all(t.done() for t in starting)

    asyncio.run(scenario())

"""The autoscaler: the thin driver between a live cluster and the pure planner (cluster/planner.py).

Every planner interval, one round:

  snapshot  the caller's `snapshot()` returns the router's window (router/window.py's `take`) and
            every worker's stats (as `pdserve status --json` shows them, plus the router's
            queued prompt tokens for the worker)
  observe   `observation(...)` (pure) turns them into a planner Observation: percentiles of the
            window's latency samples, and each worker's cumulative counters (busy_seconds,
            prompt_tokens, refused) as differences since the previous round
  decide    Planner.decide(observation, now)
  record    the decision, with its reasons, into the last `history` decisions (status --json) and
            the metrics
  actuate   `actuate(targets)` (a coroutine), started as a task: a grow that waits for its workers
            to start, or a drain that waits for requests to finish, never holds up the next round

Manual scaling while autoscaling (`pdserve scale --prefill N`) pins that pool: its bounds become
[N, N] (`pin`), so the planner never fights the operator; `set_bounds` hands it back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

from cluster.planner import Decision, Observation, Percentiles, Planner, PoolObservation, Window, WorkerObservation

logger = logging.getLogger(__name__)

COUNTERS = ("busy_seconds", "prompt_tokens", "refused")  # cumulative on the worker: the window gets differences
_STATES = ("starting", "ready", "draining", "dead")


def percentiles(values: list[float], scale: float = 1000.0) -> Percentiles:
    """p50/p90/p99 (the smallest value with at least q% of the samples at or below it), scaled
    (seconds to milliseconds by default); None where there is no sample."""
    if not values:
        return Percentiles()
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))] * scale  # noqa: E731
    return Percentiles(pick(50), pick(90), pick(99))


def worker_observation(stats: dict, previous: dict | None) -> tuple[WorkerObservation, dict]:
    """One worker's stats dict as the planner sees it, and its counters for the next round. A
    worker not seen before started during the window: its counters count from zero. A worker
    whose stats did not come this round (its call timed out: busy) keeps its counters, so the
    next round does not take its whole life's counts for one window's."""
    before = previous or {}
    counters = {name: stats.get(name, before.get(name, 0)) for name in COUNTERS}
    delta = {name: max(0, counters[name] - before.get(name, 0)) for name in COUNTERS}
    kv = stats.get("kv_blocks") or {}
    state = stats.get("state", "ready")
    observation = WorkerObservation(
        id=stats["id"], state=state if state in _STATES else "ready", queued_tokens=stats.get("queued_tokens", 0),
        running=stats.get("running", 0), waiting=stats.get("waiting", 0), kv_used_blocks=kv.get("in_use", 0),
        kv_total_blocks=kv.get("total", 0), busy_seconds=float(delta["busy_seconds"]), prompt_tokens=int(delta["prompt_tokens"]),
        refused=int(delta["refused"]), max_seqs=stats.get("max_num_seqs", 0), reported="error" not in stats,
    )  # fmt: skip
    return observation, counters


def observation(window: dict, workers: list[dict], previous: dict[str, dict], roles: tuple[str, ...],
                block_size: int) -> tuple[Observation, dict[str, dict]]:  # fmt: skip
    """The planner's Observation from a router window and the workers' stats; also the counters
    to hand in as `previous` next round. Every role in `roles` gets a pool, empty or not."""
    pools: dict[str, list[WorkerObservation]] = {role: [] for role in roles}
    counters = {}
    for stats in workers:
        if stats.get("role") not in pools:
            continue
        worker, counters[stats["id"]] = worker_observation(stats, previous.get(stats["id"]))
        pools[stats["role"]].append(worker)
    arrivals, finished = window.get("arrivals", 0), window.get("finished", 0)
    w = Window(
        duration=max(window["duration"], 1e-6), arrivals=arrivals, finished=finished,
        mean_input_len=window.get("input_tokens", 0) / arrivals if arrivals else None,
        mean_output_len=window.get("output_tokens", 0) / finished if finished else None,
        refused=window.get("refused", 0), admission_queue=window.get("admission_queue", 0),
        ttft_ms=percentiles(window.get("ttft_s", [])), itl_ms=percentiles(window.get("itl_s", [])),
    )  # fmt: skip
    return Observation(w, {role: PoolObservation(tuple(ws)) for role, ws in pools.items()}, block_size), counters


def decision_records(decision: Decision, wall_time: float) -> list[dict]:
    """The decision as plain records, one per pool (the run report's `decisions` shape)."""
    return [{"at": round(decision.at, 3), "time": round(wall_time, 3), "role": p.role, "current": p.current, "target": p.target,
             "direction": p.direction, "reason": p.reason, "detail": p.detail} for p in decision.pools]  # fmt: skip


class Autoscaler:
    """Runs the planner against a live cluster. `snapshot` returns (window, workers) as
    `observation` takes them; `actuate(targets)` resizes the pools; `on_decision(decision)`
    (optional) feeds the metrics. `clock` gives the planner's time (monotonic seconds)."""

    def __init__(self, planner: Planner, roles: tuple[str, ...], block_size: int,
                 snapshot: Callable[[], Awaitable[tuple[dict, list[dict]]]],
                 actuate: Callable[[dict[str, int]], Awaitable[None]],
                 on_decision: Callable[[Decision], None] = lambda d: None, history: int = 32,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.planner, self.roles, self.block_size = planner, roles, block_size
        self._snapshot, self._actuate, self._on_decision, self._clock = snapshot, actuate, on_decision, clock
        self.decisions: deque[dict] = deque(maxlen=history * len(roles))
        self.targets: dict[str, int] = {}
        self.rounds = 0
        self._counters: dict[str, dict] = {}
        self._actuation: asyncio.Task | None = None
        self._t0 = clock()

    @property
    def interval(self) -> float:
        return self.planner.config.interval

    async def run(self) -> None:
        """Rounds every interval until cancelled; a round that fails is logged and the next one comes."""
        await self.baseline()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the cluster serves on at its current size
                logger.exception("autoscaler round failed")

    async def baseline(self) -> None:
        """The first snapshot: starts the window and the counters the first round differences."""
        _, workers = await self._snapshot()
        self._counters = {w["id"]: {name: w.get(name, 0) for name in COUNTERS} for w in workers if "id" in w}

    async def round(self) -> Decision:
        window, workers = await self._snapshot()
        obs, self._counters = observation(window, workers, self._counters, self.roles, self.block_size)
        decision = self.planner.decide(obs, self._clock() - self._t0)
        self.rounds += 1
        self.targets = decision.targets
        self.decisions.extend(decision_records(decision, time.time()))
        for change in decision.changes:
            logger.info("planner: %s %s -> %d (%s: %s)", change.role, change.current, change.target, change.reason, change.detail)
        self._on_decision(decision)
        if decision.changes:  # only those: a held pool's `current` may be stale by now (a dead worker's replacement on its way)
            self._actuation = asyncio.ensure_future(self._apply({change.role: change.target for change in decision.changes}))
        return decision

    async def _apply(self, targets: dict[str, int]) -> None:
        try:
            await self._actuate(targets)
        except Exception:  # noqa: BLE001 - the next round sees the pools as they are and decides again
            logger.exception("resizing the pools to %s failed", targets)

    def bounds(self) -> dict[str, list[int]]:
        return {role: list(self.planner.config.bounds(role)) for role in self.roles}

    def set_bounds(self, bounds: dict[str, tuple[int, int]]) -> None:
        """New (low, high) bounds for the pools named, all or none (PlannerConfig checks them);
        the planner keeps its state."""
        fields = {f"{end}_{role}": n for role, pair in bounds.items() for end, n in zip(("min", "max"), pair)}
        self.planner.config = dataclasses.replace(self.planner.config, **fields)

    def pin(self, sizes: dict[str, int]) -> None:
        """A manual resize: each pool named stays at its size until its bounds are set again."""
        self.set_bounds({role: (n, n) for role, n in sizes.items()})

    def status(self) -> dict:
        c = self.planner.config
        return {
            "policy": c.policy, "interval": c.interval, "slo": {"ttft_ms": c.slo_ttft_ms, "itl_ms": c.slo_itl_ms},
            "bounds": self.bounds(), "targets": dict(self.targets), "rounds": self.rounds, "decisions": list(self.decisions),
        }  # fmt: skip

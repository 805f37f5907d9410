"""The autoscaler's driver: router windows and worker stats into planner observations, and one
round of observe → decide → record → actuate against fakes (no Ray, no cluster)."""

import asyncio
import pathlib
import subprocess
import sys

import pytest

from cluster.autoscaler import Autoscaler, observation, percentiles
from cluster.planner import Planner, PlannerConfig
from router.window import RequestWindow


def test_the_driver_and_the_window_import_no_ray_grpc_or_torch():
    code = ("import sys, cluster.autoscaler, router.window\n"
            "heavy = ('torch', 'ray', 'grpc', 'numpy', 'engine', 'kv_transfer', 'protos', 'simulator')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")  # fmt: skip
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_percentiles_are_the_smallest_value_with_q_percent_at_or_below_it():
    assert percentiles([]).p50 is None
    p = percentiles([0.004, 0.001, 0.003, 0.002] + [0.010] * 6)  # seconds in, ms out
    assert (p.p50, p.p90, p.p99) == (10.0, 10.0, 10.0)
    p = percentiles([i / 1000 for i in range(1, 101)])
    assert (p.p50, p.p90, p.p99) == pytest.approx((50.0, 90.0, 99.0))


def test_a_window_hands_over_what_it_saw_and_starts_again():
    w = RequestWindow(now=100.0)
    for n in (100, 300):
        w.arrived(n)
    w.first_token(0.5)
    w.gap(0.02)
    w.gap(0.04)
    w.gap(0.01, tokens=2)  # one event of two tokens, 0.02 s after the last
    w.finished(10)
    w.refused()
    taken = w.take(110.0)
    assert taken == {"duration": 10.0, "arrivals": 2, "finished": 1, "refused": 1, "input_tokens": 400, "output_tokens": 10,
                     "ttft_s": [0.5], "itl_s": [0.02, 0.04, 0.01, 0.01]}  # fmt: skip
    again = w.take(112.0)
    assert again["duration"] == 2.0 and again["arrivals"] == 0 and again["itl_s"] == []


def test_a_window_keeps_a_bounded_uniform_sample_of_latencies():
    w = RequestWindow(now=0.0, max_samples=100)
    for i in range(10_000):
        w.gap(i / 10_000)
    gaps = w.take(1.0)["itl_s"]
    assert len(gaps) == 100
    assert 0.3 < sum(gaps) / len(gaps) < 0.7  # drawn from the whole window, not its first hundred


def stats(worker_id, role, state="ready", **kw):
    return {"id": worker_id, "role": role, "state": state, **kw}


def test_observation_differences_counters_and_counts_a_new_worker_from_zero():
    window = {"duration": 10.0, "arrivals": 4, "finished": 2, "input_tokens": 2000, "output_tokens": 100, "refused": 1,
              "admission_queue": 3, "ttft_s": [0.1, 0.2, 0.3, 1.5], "itl_s": [0.05] * 9 + [0.5]}  # fmt: skip
    workers = [
        stats("prefill-0", "prefill", queued_tokens=700, busy_seconds=12.0, prompt_tokens=9000),
        stats("prefill-1", "prefill", "starting", error="not ready"),  # a starting worker answers nothing yet
        stats("decode-0", "decode", running=5, waiting=2, kv_blocks={"total": 100, "free": 40, "cached": 10, "in_use": 50},
              refused=3),  # fmt: skip
        stats("decode-2", "decode", busy_seconds=4.0, refused=1),  # new since the last round
        stats("stray", "colocated"),  # not a pool of this cluster
    ]
    previous = {"prefill-0": {"busy_seconds": 5.0, "prompt_tokens": 2000, "refused": 0}, "decode-0": {"refused": 1}}
    obs, counters = observation(window, workers, previous, ("prefill", "decode"), 16)
    assert set(obs.pools) == {"prefill", "decode"}
    p0, p1 = obs.pools["prefill"].workers
    assert (p0.state, p0.queued_tokens, p0.busy_seconds, p0.prompt_tokens) == ("ready", 700, 7.0, 7000)
    assert (p1.state, p1.busy_seconds) == ("starting", 0.0)
    d0, d2 = obs.pools["decode"].workers
    assert (d0.running, d0.waiting, d0.kv_used_blocks, d0.kv_total_blocks, d0.refused) == (5, 2, 50, 100, 2)
    assert (d2.busy_seconds, d2.refused) == (4.0, 1)
    assert obs.pools["prefill"].live == 2 and obs.pools["decode"].kv_usage == 0.5
    w = obs.window
    assert (w.rate, w.mean_input_len, w.mean_output_len, w.refused, w.admission_queue) == (0.4, 500.0, 50.0, 1, 3)
    assert (w.ttft_ms.p50, w.ttft_ms.p90, w.itl_ms.p90, w.itl_ms.p99) == (200.0, 1500.0, 50.0, 500.0)
    assert counters["prefill-0"] == {"busy_seconds": 12.0, "prompt_tokens": 9000, "refused": 0}
    assert "stray" not in counters


def test_a_worker_whose_stats_timed_out_keeps_its_counters_for_the_next_round():
    """Its lifetime's counts must not come back next round as one window's (a decode worker's 40
    refusals since it started read as 40 now: a grow for nothing)."""
    window = {"duration": 10.0, "ttft_s": [], "itl_s": []}
    lifetime = {"busy_seconds": 900.0, "prompt_tokens": 0, "refused": 40}
    busy = stats("decode-0", "decode", error="timed out")
    obs, counters = observation(window, [busy], {"decode-0": lifetime}, ("decode",), 16)
    assert counters["decode-0"] == lifetime and obs.pools["decode"].workers[0].refused == 0
    back = stats("decode-0", "decode", busy_seconds=905.0, refused=40)
    obs, _ = observation(window, [back], counters, ("decode",), 16)
    assert (obs.pools["decode"].workers[0].busy_seconds, obs.pools["decode"].workers[0].refused) == (5.0, 0)
    # a pool with no worker left still gets decided on (the planner restores its minimum)
    obs, _ = observation({"duration": 10.0}, [], {}, ("prefill", "decode"), 16)
    assert obs.pools["prefill"].live == 0 and obs.window.mean_input_len is None and obs.window.ttft_ms.p90 is None


class FakeCluster:
    """Two pools of fake workers; the router's window is whatever the test sets."""

    def __init__(self, prefill=1, decode=1):
        self.sizes = {"prefill": prefill, "decode": decode}
        self.window = {"duration": 10.0}
        self.worker = {"prefill": {}, "decode": {}}  # stats every worker of the role shows
        self.resized = []
        self.release = asyncio.Event()

    async def snapshot(self):
        workers = [stats(f"{role}-{i}", role, **self.worker[role]) for role, n in self.sizes.items() for i in range(n)]
        return dict(self.window), workers

    async def actuate(self, targets):
        self.resized.append(targets)
        await self.release.wait()  # a slow grow or drain
        self.sizes.update(targets)


def test_a_round_decides_records_and_actuates_without_waiting_for_the_resize():
    async def main():
        cluster = FakeCluster()
        now = [0.0]
        config = PlannerConfig(slo_ttft_ms=1000, slo_itl_ms=100, interval=10, up_cooldown=0, max_step=2)
        seen = []
        scaler = Autoscaler(Planner(config), ("prefill", "decode"), 16, cluster.snapshot, cluster.actuate,
                            on_decision=seen.append, clock=lambda: now[0])  # fmt: skip
        await scaler.baseline()
        # a prompt-heavy backlog: 40k tokens queued on the one prefill worker, computing 2k tokens/s
        cluster.window = {"duration": 10.0, "arrivals": 40, "input_tokens": 40_000, "ttft_s": [3.0] * 10}
        cluster.worker["prefill"] = {"queued_tokens": 40_000, "busy_seconds": 10.0, "prompt_tokens": 20_000}
        now[0] = 10.0
        decision = await scaler.round()  # returns while the resize is still under way
        assert decision.targets == {"prefill": 3, "decode": 1}
        assert [(p.role, p.direction, p.reason) for p in decision.pools] == [("prefill", "up", "backlog"), ("decode", "hold", "elsewhere")]
        await asyncio.sleep(0)  # the resize starts as a task of its own...
        assert cluster.resized == [{"prefill": 3}] and cluster.sizes["prefill"] == 1  # ...and is not done (only the pools that change)
        assert seen == [decision]
        status = scaler.status()
        assert status["targets"] == {"prefill": 3, "decode": 1} and status["rounds"] == 1
        assert [(d["role"], d["target"], d["reason"]) for d in status["decisions"]] == [("prefill", 3, "backlog"), ("decode", 1, "elsewhere")]
        assert all(d["detail"] for d in status["decisions"])
        cluster.release.set()
        await asyncio.sleep(0)
        assert cluster.sizes["prefill"] == 3

    asyncio.run(main())


def test_a_manual_resize_pins_the_pool_until_its_bounds_are_set_again():
    async def main():
        cluster = FakeCluster(prefill=2, decode=1)
        cluster.release.set()
        now = [0.0]
        config = PlannerConfig(interval=10, up_cooldown=0, down_cooldown=0, max_step=4, max_prefill=8)
        scaler = Autoscaler(Planner(config), ("prefill", "decode"), 16, cluster.snapshot, cluster.actuate, clock=lambda: now[0])
        await scaler.baseline()
        scaler.pin({"prefill": 4})
        assert scaler.bounds() == {"prefill": [4, 4], "decode": [1, 8]}
        now[0] = 10.0
        decision = await scaler.round()  # idle, yet the pinned pool goes to its pinned size
        assert decision.targets["prefill"] == 4 and decision.pools[0].reason == "min"
        await asyncio.sleep(0)
        scaler.set_bounds({"prefill": (1, 8)})
        for t in (20.0, 30.0, 40.0):  # idle: shrinks again once the planner has it back
            now[0] = t
            decision = await scaler.round()
            await asyncio.sleep(0)
        assert cluster.sizes["prefill"] == 1
        with pytest.raises(ValueError, match="prefill bounds"):  # all or none: decode's are not changed either
            scaler.set_bounds({"decode": (2, 6), "prefill": (3, 2)})
        assert scaler.bounds() == {"prefill": [1, 8], "decode": [1, 8]}

    asyncio.run(main())


def test_a_failed_round_or_resize_leaves_the_loop_running():
    async def main():
        calls = []

        async def snapshot():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("a worker did not answer")
            return {"duration": 0.01}, [stats("prefill-0", "prefill"), stats("decode-0", "decode")]

        async def actuate(targets):
            raise RuntimeError("no node offers the resource")

        config = PlannerConfig(interval=0.01, min_prefill=2)  # below the minimum: every round asks for a worker
        scaler = Autoscaler(Planner(config), ("prefill", "decode"), 16, snapshot, actuate)
        task = asyncio.ensure_future(scaler.run())
        while len(calls) < 4:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert scaler.rounds >= 2 and scaler.targets == {"prefill": 2, "decode": 1}

    asyncio.run(main())

"""The autoscaling planner on synthetic observations: exact decisions, for both policies."""

import dataclasses
import pathlib
import random
import subprocess
import sys

import pytest

from cluster.planner import (
    DRAINING, READY, STARTING, Holt, Observation, Percentiles, Planner, PlannerConfig, PoolObservation, Window,
    WorkerObservation, capacity_from_profile, parse_options, predicted_ttft_ms,
)  # fmt: skip

REASONS = {
    "up": {"min", "ttft", "backlog", "itl", "kv", "batch", "refused", "queue", "load"},
    "down": {"max", "idle", "load"},
    "hold": {"steady", "elsewhere", "starting", "cooldown", "stabilizing", "at_max", "no_data"},
}
SLO = PlannerConfig(slo_ttft_ms=1000, slo_itl_ms=100, interval=10, up_cooldown=20, down_cooldown=60, max_step=2)


class FakeProfile:
    """Prefill: 10 ms + 0.1 ms per token. Decode: 20 ms + 1 ms per sequence + 1 us per context token."""

    def prefill_seconds(self, tokens, context=0):
        return 0.01 + 1e-4 * tokens

    def decode_seconds(self, batch, context_tokens):
        return 0.02 + 0.001 * batch + 1e-6 * context_tokens


PREDICTIVE = PlannerConfig(policy="predictive", slo_ttft_ms=500, slo_itl_ms=50, max_decode=16, up_cooldown=0, max_step=16,
                           horizon=30)  # fmt: skip


def pool(ready=1, starting=0, draining=0, **each):
    """A pool whose ready (and draining) workers all look like `each`."""
    def workers(n, state, **kw):
        return tuple(WorkerObservation(f"{state}-{i}", state, **kw) for i in range(n))

    return PoolObservation(workers(ready, READY, **each) + workers(starting, STARTING) + workers(draining, DRAINING, **each))


def observe(prefill=None, decode=None, colocated=None, ttft=None, itl=None, arrivals=0, isl=None, osl=None, duration=10.0,
            refused=0, admission_queue=0):  # fmt: skip
    pools = {role: p for role, p in (("prefill", prefill), ("decode", decode), ("colocated", colocated)) if p is not None}
    window = Window(duration, arrivals, arrivals, isl, osl, Percentiles(p90=ttft), Percentiles(p90=itl), refused, admission_queue)
    return Observation(window, pools)


def summary(decision):
    """{role: (target, direction, reason)}: the exact decision, without the numbers of `detail`."""
    return {p.role: (p.target, p.direction, p.reason) for p in decision.pools}


# --- purity ------------------------------------------------------------------------------------------


def test_the_planner_imports_no_ray_grpc_asyncio_torch_or_other_parts_of_ours():
    code = ("import sys, cluster.planner\n"
            "heavy = ('torch', 'ray', 'grpc', 'asyncio', 'numpy', 'engine', 'router', 'kv_transfer', 'protos', 'simulator')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")  # fmt: skip
    root = pathlib.Path(__file__).resolve().parents[1]  # `python -c` imports from its working directory first
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_configurations_are_refused_once_with_every_problem_named():
    with pytest.raises(ValueError, match="policy must be slo or predictive.*percentile must be one of.*decode bounds"):
        PlannerConfig(policy="magic", percentile=95, min_decode=3, max_decode=2)
    with pytest.raises(ValueError, match="util_low must be below kv_high"):
        PlannerConfig(util_low=0.9, kv_high=0.8)
    with pytest.raises(ValueError, match="needs a cost profile"):
        Planner(PlannerConfig(policy="predictive"))
    with pytest.raises(ValueError, match="positive time"):
        Window(0.0)


def test_planner_options_parse_to_the_fields_types():
    assert parse_options(["horizon=45", "max_step=3", "predictor=moving_average"]) == {
        "horizon": 45.0, "max_step": 3, "predictor": "moving_average"}  # fmt: skip
    for bad in ("horizon", "horizon=", "cooldown=3"):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            parse_options([bad])
    with pytest.raises(ValueError, match="max_step=1.5: expected int"):
        parse_options(["max_step=1.5"])


# --- the slo policy: which pool grows ----------------------------------------------------------------


def test_a_prompt_heavy_backlog_grows_prefill_and_not_decode():
    planner = Planner(SLO)
    # Two busy prefill workers computing 5,000 prompt tokens/s each, 60,000 tokens queued: 6 s of
    # work against a 1 s TTFT budget. Decode is comfortable.
    obs = observe(prefill=pool(2, busy_seconds=9.0, prompt_tokens=45_000, queued_tokens=30_000),
                  decode=pool(2, kv_used_blocks=300, kv_total_blocks=1000, running=10), ttft=2600, itl=40)  # fmt: skip
    decision = planner.decide(obs, now=0.0)
    assert summary(decision) == {"prefill": (4, "up", "backlog"), "decode": (2, "hold", "elsewhere")}
    assert decision.targets == {"prefill": 4, "decode": 2}
    changes = [(c.role, c.current, c.target, c.direction, c.reason) for c in decision.changes]
    assert changes == [("prefill", 2, 4, "up", "backlog")]
    prefill = decision.pools[0]
    assert "backlog needs 6.00 s at 5000 tokens/s per worker, TTFT over SLO" in prefill.detail
    assert "not for lack of decode workers" in decision.pools[1].detail


def test_long_decodes_with_rising_itl_grow_decode_and_not_prefill():
    planner = Planner(SLO)
    prefill = pool(2, busy_seconds=1.0, prompt_tokens=4_000)  # 10% busy: would shrink, were the SLOs held
    decode = lambda kv: pool(2, kv_used_blocks=kv, kv_total_blocks=1000, running=60)  # noqa: E731
    decisions = [planner.decide(observe(prefill=prefill, decode=decode(kv), ttft=250, itl=itl), now)
                 for now, itl, kv in ((0, 70, 500), (10, 90, 600), (20, 130, 700))]  # fmt: skip
    assert [summary(d) for d in decisions] == [
        {"prefill": (2, "hold", "stabilizing"), "decode": (2, "hold", "steady")},
        {"prefill": (2, "hold", "stabilizing"), "decode": (2, "hold", "steady")},
        {"prefill": (2, "hold", "elsewhere"), "decode": (3, "up", "itl")},  # ceil(2 x 130 / 100) = 3
    ]
    assert "an SLO is missed, not for lack of prefill workers" in decisions[2].pools[0].detail


@pytest.mark.parametrize(
    "decode, reason, target",
    [
        (pool(2, kv_used_blocks=900, kv_total_blocks=1000), "kv", 3),  # ceil(2 x 0.9 / 0.85)
        (pool(4, kv_used_blocks=990, kv_total_blocks=1000), "kv", 5),  # ceil(4 x 0.99 / 0.85)
        (pool(2, kv_used_blocks=100, kv_total_blocks=1000, refused=1), "refused", 3),
    ],
)  # fmt: skip
def test_kv_pressure_or_refused_reservations_grow_decode(decode, reason, target):
    decision = Planner(SLO).decide(observe(prefill=pool(2), decode=decode, ttft=300, itl=50), now=0.0)
    assert summary(decision)["decode"] == (target, "up", reason)
    assert summary(decision)["prefill"][1] != "up"


@pytest.mark.parametrize("window, reason", [(dict(refused=3), "refused"), (dict(admission_queue=5), "queue")])
def test_requests_the_router_refused_or_holds_for_kv_room_grow_the_pool_admission_waits_on(window, reason):
    # The workers refused nothing (the router's view kept it from asking them) and KV usage looks
    # moderate, yet the router turned requests away or queues them: admission waits on decode KV.
    quiet = dict(kv_used_blocks=500, kv_total_blocks=1000)
    decision = Planner(SLO).decide(observe(prefill=pool(2), decode=pool(2, **quiet), ttft=300, itl=50, **window), now=0.0)
    assert summary(decision)["decode"] == (3, "up", reason) and summary(decision)["prefill"][1] != "up"
    colocated = Planner(SLO).decide(observe(colocated=pool(2, **quiet), ttft=300, itl=50, **window), now=0.0)
    assert summary(colocated)["colocated"] == (3, "up", reason)
    calm = Planner(SLO).decide(observe(prefill=pool(2), decode=pool(2, **quiet), ttft=300, itl=50), now=0.0)
    assert summary(calm)["decode"] == (2, "hold", "steady")


def test_full_batches_grow_decode_before_requests_queue_and_a_queue_grows_it_in_proportion():
    # KV 10% used but 240 of 256 batch slots taken on each worker: the batch is what runs out.
    full = pool(2, running=230, waiting=10, kv_used_blocks=100, kv_total_blocks=1000, max_seqs=256)
    decision = Planner(SLO).decide(observe(prefill=pool(2), decode=full, ttft=300, itl=50), now=0.0)
    assert summary(decision)["decode"] == (3, "up", "batch")  # ceil(2 x 240/256 / 0.85)
    # 200 sequences held on 2 workers and 300 more queued: 5 workers' worth, 2 more at most per decision.
    held = pool(2, running=100, kv_used_blocks=100, kv_total_blocks=1000, max_seqs=256)
    queued = observe(prefill=pool(2), decode=held, ttft=300, itl=50, admission_queue=300)
    assert summary(Planner(SLO).decide(queued, now=0.0))["decode"] == (4, "up", "queue")
    unbounded = dataclasses.replace(SLO, max_step=16)
    assert summary(Planner(unbounded).decide(queued, now=0.0))["decode"] == (5, "up", "queue")


def test_ttft_over_slo_with_an_idle_prefill_pool_is_not_a_prefill_shortage():
    # TTFT is missed because requests wait for decode KV room (reservations refused), not for prefill.
    obs = observe(prefill=pool(2, busy_seconds=0.5, prompt_tokens=2_000),
                  decode=pool(2, kv_used_blocks=700, kv_total_blocks=1000, refused=5), ttft=1800, itl=60)  # fmt: skip
    assert summary(Planner(SLO).decide(obs, now=0.0)) == {"prefill": (2, "hold", "elsewhere"), "decode": (3, "up", "refused")}


def test_a_pool_with_workers_starting_is_not_grown_again_until_a_window_shows_them():
    planner = Planner(SLO)
    decode = lambda ready, starting=0: pool(ready, starting, kv_used_blocks=300, kv_total_blocks=1000)  # noqa: E731
    steps = [(0, decode(2)), (10, decode(2, 1)), (20, decode(3)), (30, decode(3)), (40, decode(3, 2))]
    got = [summary(planner.decide(observe(prefill=pool(2), decode=d, ttft=300, itl=150), now))["decode"] for now, d in steps]
    assert got == [
        (3, "up", "itl"),  # ceil(2 x 150 / 100)
        (3, "hold", "starting"),  # one starting: the ITL still shows the pool without it
        (3, "hold", "starting"),  # ready, but the window still covers the time before
        (5, "up", "itl"),  # a whole window with it and ITL still over: grow again, ceil(3 x 1.5)
        (5, "hold", "starting"),
    ]


# --- bounds, steps, cooldowns ------------------------------------------------------------------------


def test_bounds_and_step_limits_hold():
    config = dataclasses.replace(SLO, max_prefill=5, min_decode=2, max_decode=3, max_step=2)
    planner = Planner(config)
    swamped = dict(busy_seconds=10.0, prompt_tokens=10_000, queued_tokens=100_000)  # 10 s of backlog per worker
    d = planner.decide(observe(prefill=pool(1, **swamped), decode=pool(1), ttft=9000, itl=50), 0)
    assert summary(d) == {"prefill": (3, "up", "backlog"), "decode": (2, "up", "min")}  # +2 at most; min 2 at once
    d = planner.decide(observe(prefill=pool(3, **swamped), decode=pool(2), ttft=9000, itl=50), 20)
    assert summary(d)["prefill"] == (5, "up", "backlog")  # the maximum
    d = planner.decide(observe(prefill=pool(5, **swamped), decode=pool(2), ttft=9000, itl=50), 40)
    assert summary(d)["prefill"] == (5, "hold", "at_max") and "wants 500, bounded by 5" in d.pools[0].detail
    d = planner.decide(observe(prefill=pool(5, **swamped), decode=pool(4), ttft=9000, itl=50), 45)
    assert summary(d)["decode"] == (3, "down", "max")  # above the maximum (say, a manual scale): back at once
    planner = Planner(config)
    idle = lambda n: observe(prefill=pool(n, busy_seconds=0.1, prompt_tokens=100), decode=pool(2), ttft=200, itl=40)  # noqa: E731
    got = [summary(planner.decide(idle(n), now))["prefill"] for now, n in ((0, 5), (60, 5), (70, 3), (120, 3), (130, 3))]
    # Down 2 at most a step, and the wish to shrink again starts over after each change.
    assert got == [(5, "hold", "stabilizing"), (3, "down", "idle"), (3, "hold", "stabilizing"), (3, "hold", "stabilizing"),
                   (1, "down", "idle")]  # fmt: skip


def test_growth_waits_for_the_up_cooldown_and_shrinking_for_a_whole_down_cooldown():
    planner = Planner(SLO)
    hot = lambda n: observe(prefill=pool(2), decode=pool(n, kv_total_blocks=1000), ttft=300, itl=120)  # noqa: E731
    assert summary(planner.decide(hot(2), 0))["decode"] == (3, "up", "itl")
    assert summary(planner.decide(hot(3), 10))["decode"] == (3, "hold", "cooldown")
    assert summary(planner.decide(hot(3), 20))["decode"] == (4, "up", "itl")  # ceil(3 x 1.2)
    idle = observe(prefill=pool(2), decode=pool(4, kv_total_blocks=1000, kv_used_blocks=50), ttft=300, itl=30)
    got = [summary(planner.decide(idle, now))["decode"] for now in (30, 40, 80, 90)]
    # Wished since 30, for 60 s: down to what fits, ceil(4 x 30 / (0.8 x 100)) = 2.
    assert got == [(4, "hold", "stabilizing")] * 3 + [(2, "down", "idle")]


def test_a_shrink_goes_to_the_largest_size_wished_during_the_cooldown():
    planner = Planner(dataclasses.replace(SLO, max_step=8))
    busy = iter([0.05, 0.05, 0.25, 0.05, 0.05, 0.05, 0.05])  # one window needs 5 of the 6 workers' worth
    got = []
    for now in range(0, 70, 10):
        prefill = pool(6, busy_seconds=10 * next(busy), prompt_tokens=1000)
        got.append(summary(planner.decide(observe(prefill=prefill, decode=pool(2), ttft=200, itl=40), now))["prefill"])
    assert got == [(6, "hold", "stabilizing")] * 6 + [(5, "down", "idle")]  # ceil(6 x 0.25 / 0.3) = 5


def test_shrinking_needs_both_slos_held():
    planner = Planner(SLO)
    for now in range(0, 200, 10):  # prefill idle for minutes, but ITL is over its SLO
        d = planner.decide(observe(prefill=pool(3, busy_seconds=0.1, prompt_tokens=100), decode=pool(2), ttft=100, itl=101), now)
        assert summary(d)["prefill"] == (3, "hold", "elsewhere")


def test_a_worker_still_starting_does_not_hold_back_a_shrink():
    """It may never start (no node offers its resource): an idle pool still shrinks."""
    planner = Planner(SLO)
    idle = lambda now: planner.decide(observe(prefill=pool(1), decode=pool(4, 1, kv_total_blocks=1000), ttft=100, itl=30), now)  # noqa: E731
    got = [summary(idle(now))["decode"] for now in range(0, 70, 10)]
    assert got == [(5, "hold", "stabilizing")] * 6 + [(3, "down", "idle")]


def test_a_worker_whose_stats_did_not_come_is_not_taken_for_idle():
    """Its call timed out (busy): the pool's utilisation is its reporting workers', so two prefill
    workers 80% busy with a third silent are 80% busy, not 53%, and a full batch stays full."""
    silent = WorkerObservation("silent", READY, reported=False)
    busy = pool(2, busy_seconds=8.0, prompt_tokens=8_000)
    prefill = PoolObservation(busy.workers + (silent,))
    assert prefill.busy(10.0) == pytest.approx(0.8)
    full = pool(1, running=250, max_seqs=256, kv_used_blocks=500, kv_total_blocks=1000)
    decode = PoolObservation(full.workers + (dataclasses.replace(silent, max_seqs=256, kv_total_blocks=1000),))
    assert decode.seq_usage == pytest.approx(250 / 256) and decode.kv_usage == pytest.approx(0.5)
    d = Planner(SLO).decide(observe(prefill=prefill, decode=decode, ttft=1500, itl=40), 0)
    assert summary(d) == {"prefill": (5, "up", "ttft"), "decode": (3, "up", "batch")}  # min(3 + 2, ...); ceil(2 x 0.98 / 0.85)
    # None of them reported: nothing is known of their load, so neither shrunk nor blocked from growing on TTFT
    nobody = PoolObservation((silent, dataclasses.replace(silent, id="silent-2")))
    d = Planner(dataclasses.replace(SLO, down_cooldown=0)).decide(observe(prefill=nobody, decode=nobody, ttft=100, itl=30), 0)
    assert summary(d) == {"prefill": (2, "hold", "no_data"), "decode": (2, "hold", "no_data")}
    d = Planner(SLO).decide(observe(prefill=nobody, decode=pool(1), ttft=1500, itl=30), 0)
    assert summary(d)["prefill"] == (3, "up", "ttft")


def test_a_growth_is_labelled_with_the_signal_that_sized_it():
    # ITL 1% over its SLO asks for ceil(2 x 1.01) = 3; 30 queued requests for 2 x (20 + 30) / 20 = 5.
    obs = observe(prefill=pool(1), decode=pool(2, running=10, kv_total_blocks=1000), ttft=100, itl=101, admission_queue=30)
    d = Planner(dataclasses.replace(SLO, max_step=4)).decide(obs, 0)
    assert summary(d)["decode"] == (5, "up", "queue") and "ITL over SLO" in d.pools[1].detail


def test_draining_workers_do_not_count_and_starting_ones_do():
    d = Planner(SLO).decide(observe(prefill=pool(2, starting=1, draining=3), decode=pool(1, draining=1), ttft=300, itl=40), 0)
    assert [(p.role, p.current) for p in d.pools] == [("prefill", 3), ("decode", 1)]


# --- no flapping -------------------------------------------------------------------------------------


def test_noise_around_the_shrink_threshold_changes_nothing():
    planner = Planner(SLO)
    rng = random.Random(7)
    for now in range(0, 1200, 10):  # 2 prefill workers, every other window loaded lightly enough for one
        busy = (0.12 if now % 20 else 0.2) + rng.uniform(-0.02, 0.02)
        prefill, decode = pool(2, busy_seconds=10 * busy, prompt_tokens=1000), pool(2, kv_total_blocks=10)
        ttft, itl = 300 + rng.uniform(-100, 100), 60 + rng.uniform(-10, 10)
        d = planner.decide(observe(prefill=prefill, decode=decode, ttft=ttft, itl=itl), now)
        assert all(p.direction == "hold" for p in d.pools), (now, d)


def test_a_noisy_steady_load_settles_without_flapping():
    """Closed loop: the observations follow the pool sizes the planner asked for (new workers start
    for one window). A steady load with +-15% noise, enough to cross the ITL SLO now and then at two
    decode workers: the planner settles, then never moves."""
    config = dataclasses.replace(SLO, max_prefill=6, max_decode=6)
    planner = Planner(config)
    rng = random.Random(3)
    sizes = {"prefill": (1, 0), "decode": (1, 0)}  # (ready, starting)
    changes = []
    for now in range(0, 1800, 10):
        noise = lambda: 1 + rng.uniform(-0.15, 0.15)  # noqa: E731
        (p, ps), (dd, ds) = sizes["prefill"], sizes["decode"]
        busy = min(1.0, 6000 / (p * 5000) * noise())  # 6,000 prompt tokens/s offered, 5,000 per worker
        backlog = max(0, int((6000 - p * 5000) * 10))
        ttft = 200 / (1 - min(busy, 0.95)) * noise()
        itl = (30 + 120 / dd) * noise()  # the decode step shrinks as sequences spread over workers
        prefill = pool(p, ps, busy_seconds=10 * busy, prompt_tokens=int(10 * busy * 5000), queued_tokens=backlog // p)
        decode = pool(dd, ds, running=40 // dd, kv_used_blocks=800 // dd, kv_total_blocks=1000)
        obs = observe(prefill=prefill, decode=decode, ttft=ttft, itl=itl)
        d = planner.decide(obs, now)
        for pd in d.pools:
            ready, starting = sizes[pd.role]
            sizes[pd.role] = (min(ready + starting, pd.target), max(0, pd.target - ready - starting))  # starting: ready next time
            if pd.direction != "hold":
                changes.append((now, pd.role, pd.direction))
    # A noisy window over the ITL SLO at 90 s grows decode once more; then 28 minutes of nothing.
    assert changes == [(0, "prefill", "up"), (0, "decode", "up"), (90, "decode", "up")]
    assert sizes == {"prefill": (3, 0), "decode": (3, 0)}
    for role in ("prefill", "decode"):  # never two changes of a pool within a cooldown
        times = [t for t, r, _ in changes if r == role]
        assert all(b - a >= config.up_cooldown for a, b in zip(times, times[1:]))


# --- colocated ----------------------------------------------------------------------------------------


def test_a_colocated_pool_answers_both_prompt_and_decode_signals():
    planner = Planner(SLO)
    loaded = pool(2, queued_tokens=2_000, busy_seconds=10.0, prompt_tokens=20_000, kv_total_blocks=1000)
    obs = observe(colocated=loaded, ttft=1500, itl=60)
    assert summary(planner.decide(obs, 0)) == {"colocated": (3, "up", "ttft")}  # ceil(2 x 1500 / 1000)
    obs = observe(colocated=pool(3, kv_used_blocks=950, kv_total_blocks=1000), ttft=300, itl=60)
    assert summary(planner.decide(obs, 30)) == {"colocated": (4, "up", "kv")}  # ceil(3 x 0.95 / 0.85)
    idle = observe(colocated=pool(4, kv_used_blocks=50, kv_total_blocks=1000), ttft=200, itl=30)
    got = [summary(planner.decide(idle, now))["colocated"] for now in (40, 100)]
    # ITL 30 of 0.8 x 100 ms: fits in ceil(4 x 30 / 80) = 2 (TTFT: ceil(4 x 200 / 800) = 1).
    assert got == [(4, "hold", "stabilizing"), (2, "down", "idle")]


# --- every decision, whatever it sees ------------------------------------------------------------------


def random_observation(rng, roles):
    def random_pool():
        ready, starting, draining = rng.randint(0, 9), rng.choice([0, 0, 0, 1, 2]), rng.choice([0, 0, 1])
        total = rng.choice([0, 1000])
        return pool(ready, starting, draining, queued_tokens=rng.choice([0, rng.randint(0, 50_000)]), running=rng.randint(0, 50),
                    waiting=rng.randint(0, 5), kv_used_blocks=rng.randint(0, total), kv_total_blocks=total,
                    busy_seconds=rng.uniform(0, 10), prompt_tokens=rng.choice([0, rng.randint(0, 80_000)]),
                    refused=rng.choice([0, 0, 0, 2]))  # fmt: skip

    maybe = lambda x: rng.choice([None, x])  # noqa: E731
    return observe(**{r: random_pool() for r in roles}, ttft=maybe(rng.uniform(10, 3000)), itl=maybe(rng.uniform(5, 300)),
                   arrivals=rng.randint(0, 80), isl=maybe(rng.uniform(10, 3000)), osl=maybe(rng.uniform(1, 800)))  # fmt: skip


@pytest.mark.parametrize("policy", ["slo", "predictive"])
@pytest.mark.parametrize("roles", [("prefill", "decode"), ("colocated",)])
def test_every_decision_has_a_reason_respects_bounds_and_steps_and_is_deterministic(policy, roles):
    config = dataclasses.replace(SLO, policy=policy, min_prefill=2, max_prefill=7, max_decode=6, max_colocated=5, up_cooldown=0)
    observations = [random_observation(random.Random(i), roles) for i in range(300)]
    runs = []
    for _ in range(2):
        planner = Planner(config, FakeProfile())
        runs.append([planner.decide(obs, now=5.0 * i) for i, obs in enumerate(observations)])
    assert runs[0] == runs[1]  # the same observations at the same times: the same decisions
    seen = set()
    for obs, decision in zip(observations, runs[0]):
        assert [p.role for p in decision.pools] == list(roles)
        for p in decision.pools:
            lo, hi = config.bounds(p.role)
            assert p.reason in REASONS[p.direction] and p.detail, p
            assert p.current == obs.pools[p.role].live
            assert lo <= p.target <= hi
            if lo <= p.current <= hi:
                assert abs(p.target - p.current) <= config.max_step, p
            seen.add((p.direction, p.reason))
    assert len(seen) >= 6  # the random walk went through many kinds of decisions


# --- the predictive policy -----------------------------------------------------------------------------


def test_capacity_from_a_hand_computed_profile():
    profile, config = FakeProfile(), PlannerConfig(slo_ttft_ms=500, slo_itl_ms=50, prefill_max_tokens=2048)
    cap = capacity_from_profile(profile, config, input_len=500, output_len=200)
    # Prefill: 4 prompts a step (2,000 tokens, 210 ms); a prompt waits one step, rides the next: 420 <= 500 ms.
    assert cap.prefill_step_tokens == 2000 and cap.prefill_tokens_per_s == pytest.approx(2000 / 0.21)
    # Decode at context 500 + 200/2 = 600: 20 + 1.6 b ms <= 50 -> b = 18, a 48.8 ms step.
    assert cap.decode_batch == 18 and cap.decode_tokens_per_s == pytest.approx(18 / 0.0488)
    assert cap.ttft_reachable and cap.itl_reachable
    tight = capacity_from_profile(profile, config, 500, 200, ttft_ms=300, itl_ms=25)
    assert tight.prefill_step_tokens == 1000 and tight.prefill_tokens_per_s == pytest.approx(1000 / 0.11)
    assert tight.decode_batch == 3 and tight.decode_tokens_per_s == pytest.approx(3 / 0.0248)
    # 2 x 60 ms > 100 ms: one-prompt steps, busy at most 100/60 - 1 of the time.
    partial = capacity_from_profile(profile, config, 500, 200, ttft_ms=100)
    assert partial.prefill_step_tokens == 500 and partial.prefill_tokens_per_s == pytest.approx((0.1 / 0.06 - 1) * 500 / 0.06)
    hopeless = capacity_from_profile(profile, config, 500, 200, ttft_ms=50, itl_ms=15)
    assert not hopeless.ttft_reachable and hopeless.prefill_tokens_per_s == pytest.approx(500 / 0.06)  # sized to keep up
    assert not hopeless.itl_reachable and hopeless.decode_batch == 1
    # Long prompts are cut into budget-sized chunks: 5,000 tokens = 3 steps of 2,048 (214.8 ms each).
    long = capacity_from_profile(profile, config, 5000, 200, ttft_ms=1000)
    assert long.prefill_step_tokens == 2048 and long.prefill_tokens_per_s == pytest.approx(2048 / 0.2148)
    assert not capacity_from_profile(profile, config, 5000, 200, ttft_ms=600).ttft_reachable  # 3 x 214.8 ms > 600
    # The decode batch is bounded by the KV that fits under the high-water mark: 0.85 x 6,000 / 600 = 8.
    assert capacity_from_profile(profile, config, 500, 200, kv_tokens=6000).decode_batch == 8


def test_modelled_ttft_from_idle_to_saturated():
    profile = FakeProfile()
    assert predicted_ttft_ms(profile, 500, 2048, 2000) == pytest.approx((1 + 0.24) * 60)  # busy 24% of the time
    assert predicted_ttft_ms(profile, 500, 2048, 9000) == pytest.approx(2 * 110)  # 2-prompt steps keep up
    assert predicted_ttft_ms(profile, 500, 2048, 10_000) is None  # more than 4-prompt steps can compute


def ramp_run(config, rates, isl=500, osl=200):
    planner = Planner(config, FakeProfile())
    decode = 1
    got = []
    for i, rate in enumerate(rates):
        obs = observe(prefill=pool(1), decode=pool(decode, kv_total_blocks=100_000), arrivals=rate * 10, isl=isl, osl=osl)
        d = planner.decide(obs, 10.0 * i)
        decode = d.targets["decode"]
        got.append(decode)
    return got


def test_a_rising_rate_is_provisioned_ahead_of_the_slo_breach():
    rates = [2, 4, 6, 8, 10, 12, 12, 12]
    needed_now = [-(-r * 200 * 0.0488 // 18) for r in rates]  # ceil(rate x 200 tokens / 368.9 tokens/s per worker)
    assert needed_now == [2, 3, 4, 5, 6, 7, 7, 7]
    holt = ramp_run(PREDICTIVE, rates)
    # Holt's forecasts 30 s ahead (3 windows): 2, 3.9, 6.77, 9.98, 13.19 req/s over the ramp.
    assert holt[:5] == [2, 3, 4, 6, 8]
    assert all(h >= n for h, n in zip(holt, needed_now))
    assert holt[3] == needed_now[4] and holt[4] > needed_now[5]  # sized for the load a window or two ahead
    # A moving average lags behind instead: the mean of the windows so far.
    lagging = ramp_run(dataclasses.replace(PREDICTIVE, predictor="moving_average"), rates)
    assert lagging[:5] == [2, 2, 3, 3, 4]
    # Latencies were within the SLOs all along: the reactive policy would not have moved.
    slo = Planner(dataclasses.replace(SLO, slo_itl_ms=50, max_decode=16))
    for i, rate in enumerate(rates):
        obs = observe(prefill=pool(1), decode=pool(2, kv_total_blocks=1000), ttft=200, itl=40, arrivals=rate * 10)
        d = slo.decide(obs, 10.0 * i)
        assert d.pools[1].direction == "hold"


def test_holts_forecast_after_a_lull_is_the_returning_load_not_a_negative_trend():
    """A fall to zero drove the level below zero (-2.7 after four windows of nothing): when 20 req/s
    came back, the forecast 4.5 windows ahead was 9.5 req/s. (After one or two such windows the
    level is still above zero; the trend then lags the turn, as Holt's does at any turning point.)"""
    holt = Holt(PREDICTIVE)
    for x in [20] * 6 + [0] * 4:
        holt.add(x)
    assert holt.level == 0 and holt.trend == 0
    holt.add(20)
    assert holt.forecast(4.5) == pytest.approx(23.5)  # level 10 (alpha 0.5 of 20), trend 3 (beta 0.3 of 10)


def test_observed_latency_above_the_model_shrinks_the_budget_capacity_is_computed_at():
    planner = Planner(PREDICTIVE, FakeProfile())
    # 4 req/s of 500 tokens into one prefill worker: the model says TTFT (1 + 0.24) x 60 = 74.4 ms.
    # 10 sequences per decode worker at context 600: a 36 ms step. Both observed at twice that.
    obs = observe(prefill=pool(1), decode=pool(2, running=10, kv_total_blocks=100_000), ttft=148.8, itl=72,
                  arrivals=40, isl=500, osl=200)  # fmt: skip
    d = planner.decide(obs, 0)
    # So capacities are computed at TTFT 250 ms and ITL 25 ms: 9,091 prompt tokens/s (2-prompt steps),
    # 121 output tokens/s (batch 3): 4 x 200 / 121 = 6.6 decode workers.
    assert "9091 prompt tokens/s per worker at TTFT 250 ms" in d.pools[0].detail
    assert "121 output tokens/s per worker (batch 3) at ITL 25 ms" in d.pools[1].detail
    assert summary(d) == {"prefill": (1, "hold", "steady"), "decode": (7, "up", "load")}
    # A profile ten times too pessimistic is corrected by at most max_correction (2).
    planner = Planner(PREDICTIVE, FakeProfile())
    d = planner.decide(dataclasses.replace(obs, window=dataclasses.replace(obs.window, itl_ms=Percentiles(p90=3.6))), 0)
    assert "at ITL 100 ms" in d.pools[1].detail


def test_predictive_counts_starting_workers_and_shrinks_only_after_the_cooldown():
    config = dataclasses.replace(PREDICTIVE, down_cooldown=30)
    planner = Planner(config, FakeProfile())
    load = dict(prefill=pool(1), arrivals=100, isl=500, osl=200)  # 10 req/s: 6 decode workers
    assert summary(planner.decide(observe(decode=pool(1, kv_total_blocks=100_000), **load), 0))["decode"] == (6, "up", "load")
    d = planner.decide(observe(decode=pool(1, 5, kv_total_blocks=100_000), **load), 10)
    assert summary(d)["decode"] == (6, "hold", "steady")  # the 5 starting ones count
    light = dict(prefill=pool(1), arrivals=10, isl=500, osl=200)
    got = [summary(planner.decide(observe(decode=pool(6, kv_total_blocks=100_000), **light), now))["decode"]
           for now in (20, 30, 40, 50)]  # fmt: skip
    assert got == [(6, "hold", "stabilizing")] * 3 + [(1, "down", "load")]  # 1 req/s: 0.54 decode workers' worth


def test_a_noisy_steady_rate_does_not_flap_the_predictive_policy():
    planner = Planner(dataclasses.replace(PREDICTIVE, up_cooldown=20), FakeProfile())
    rng = random.Random(11)
    decode, changes = 1, []
    for now in range(0, 1800, 10):  # 10 req/s +-15%: 4.6 to 6.2 decode workers' worth
        arrivals = round(100 * rng.uniform(0.85, 1.15))
        obs = observe(prefill=pool(1), decode=pool(decode, kv_total_blocks=100_000), arrivals=arrivals, isl=500, osl=200)
        d = planner.decide(obs, now)
        decode = d.targets["decode"]
        changes += [(now, p.target) for p in d.changes]
    # Grown to what a noisy peak needs (6.2 workers' worth), then held for half an hour: a shrink to 6
    # would leave less than 20% headroom whenever the prediction is above 4.8.
    assert changes == [(0, 6), (20, 7)]


def test_a_trend_forecast_past_zero_does_not_shrink_a_pool_below_the_load_now():
    """Holt's trend after a fall runs below zero a horizon ahead while 8 req/s still arrive: a shrink
    takes effect at once, so it is sized for the last window's rate too (8 req/s: 4.3 decode
    workers' worth, 5.4 with headroom)."""
    planner = Planner(dataclasses.replace(PREDICTIVE, down_cooldown=30), FakeProfile())
    decode, got = 1, []
    for i, rate in enumerate([40] * 4 + [30, 20, 10] + [8] * 12):
        d = planner.decide(observe(prefill=pool(1), decode=pool(decode, kv_total_blocks=100_000), arrivals=rate * 10, isl=500,
                                   osl=200), 10.0 * i)  # fmt: skip
        decode = d.targets["decode"]
        got.append((rate, decode, d.pools[1].detail))
    assert all("no load predicted" not in detail for *_, detail in got)
    assert [n for rate, n, _ in got if rate == 8][-1] == 6 and all(n >= 5 for rate, n, _ in got if rate <= 10)


def test_prefill_is_sized_before_any_request_has_finished():
    """Output lengths are known only once requests finish; the prefill pool needs only the rate and
    the prompts' length: 50 req/s of 4,000 tokens into one worker is sized at once."""
    obs = observe(prefill=pool(1), decode=pool(1, kv_total_blocks=100_000), arrivals=500, isl=4_000)
    obs = dataclasses.replace(obs, window=dataclasses.replace(obs.window, finished=0, mean_output_len=None))
    d = Planner(dataclasses.replace(PREDICTIVE, max_prefill=8), FakeProfile()).decide(obs, 0)
    assert summary(d) == {"prefill": (8, "up", "load"), "decode": (1, "hold", "no_data")}


def test_no_traffic_yet_holds_and_no_load_goes_to_the_minimum():
    planner = Planner(PREDICTIVE, FakeProfile())
    d = planner.decide(observe(prefill=pool(1), decode=pool(3), arrivals=5), 0)  # lengths unknown
    assert summary(d) == {"prefill": (1, "hold", "no_data"), "decode": (3, "hold", "no_data")}
    planner = Planner(dataclasses.replace(PREDICTIVE, down_cooldown=0), FakeProfile())
    d = planner.decide(observe(prefill=pool(2), decode=pool(3)), 0)
    assert summary(d) == {"prefill": (1, "down", "load"), "decode": (1, "down", "load")}

"""The simulator on hand-computed cases (a fake profile with round costs), its invariants on a busy
run, the planner it runs (the cluster's own), and `pdserve sim` / `pdserve sim search` end to end."""

import dataclasses
import json
import subprocess
import sys
import types

import pytest

from benchmarks.workload import Request
from router.workers import Role
from simulator import EngineSpec, SimConfig, Simulation
from simulator.worker import PROMPT, Seq, SimWorker


@dataclasses.dataclass(frozen=True)
class FakeProfile:
    """Round numbers: a step costs 10 ms + 0.1 ms per prompt token + 1 ms per decoding sequence
    (no dependence on context); a transfer 5 ms + 1 GB/s; 1,000 bytes of KV per token."""

    name: str = "fake"
    source: str = "derived"
    model: str = "fake"
    hardware: str = "none"
    kv_bytes_per_token: int = 1000
    kv_capacity_tokens: int = 1600  # 100 blocks of 16
    startup_seconds: float = 5.0

    def prefill_seconds(self, tokens, context=0):
        return 0.010 + 1e-4 * tokens

    def decode_seconds(self, batch, context_tokens):
        return 0.010 + 1e-3 * batch

    def step_seconds(self, prefill, decode_batch, decode_context_tokens):
        return 0.010 + 1e-4 * sum(t for t, _ in prefill) + 1e-3 * decode_batch

    def transfer_seconds(self, backend, nbytes):
        return 0.005 + nbytes / 1e9


class SlowTransfer(FakeProfile):
    """FakeProfile with KV transfers of 1 s: a reservation sits on its decode worker that long."""

    def transfer_seconds(self, backend, nbytes):
        return 1.0


def run(requests, profile=FakeProfile(), **config):
    sim = Simulation(SimConfig(**config), profile)
    result = sim.run(requests)
    return sim, result, result.columns.arrays()


def assert_all_blocks_back(sim):
    for w in sim.workers.values():
        assert w.is_empty() and w.waiting_blocks == 0, w.id
        assert w.used_blocks(sim.now) == 0, (w.id, w.used_blocks(sim.now))
        assert w.evictable == w.prefix_blocks  # cached prefixes only, no reference held


class Watcher:
    """A planner that looks and asks for `targets` (none: the pools as they are), every `interval` s."""

    def __init__(self, interval, targets=None):
        self.config = types.SimpleNamespace(interval=interval)
        self.targets = targets or {}
        self.seen = []  # (time, observation)

    def decide(self, observation, now):
        self.seen.append((now, observation))
        return types.SimpleNamespace(pools=[], targets=self.targets)


class Sink:
    """What a lone SimWorker reports: its token gaps (mid-time, seconds, count) and first tokens."""

    def __init__(self):
        self.itl = []

    def on_itl(self, t, seconds, count):
        self.itl.append((t, seconds, count))

    def on_first_token(self, req, t):
        pass


def seq(length, steps):
    """A sequence for a lone SimWorker, of a request that has had no token yet."""
    return Seq(types.SimpleNamespace(first_token=None, prefill_start=None), PROMPT, length, steps)


def steps_until(w, end, done):
    """End the lone worker's steps, from the one ending at `end`, until done(); the next end."""
    while not done():
        w.step_end(end)
        end = w.next_end
    return end


def test_one_request_alone():
    # prefill: one step of 100 tokens (20 ms); transfer: 7 blocks x 16 tokens x 1000 B = 112 kB (5.112 ms);
    # the decode worker is idle, so the sequence joins at once (token 1 reaches the client then) and
    # its first step (batch 1: 11 ms) starts, bringing token 2.
    sim, result, c = run([Request(1.0, 100, 5)], prefill=1, decode=1)
    prefill, transfer, step = 0.020, 0.005 + 112_000 / 1e9, 0.011
    assert c["status"].tolist() == ["ok"]
    assert c["ttft"][0] == pytest.approx(prefill + transfer)
    assert c["e2e"][0] == pytest.approx(prefill + transfer + 4 * step)  # output 5 = the prefill's token + 4 decode steps
    assert c["itl_mean"][0] == pytest.approx(step)
    assert result.itl["count"] == [4] and result.itl["value"][0] == pytest.approx(step)  # 4 steps, one token each
    assert_all_blocks_back(sim)


def test_control_message_latency_is_added_per_hop():
    # The request of test_one_request_alone, with 1 ms per client hop and 2 ms per worker hop: two
    # client hops and four worker hops (reserve, its answer, the prefill call, the poll) on TTFT and
    # E2E; colocated two worker hops (submit, poll). The steps do not move: ITL is unchanged.
    hops = {"client_hop": 0.001, "worker_hop": 0.002}
    _, _, plain = run([Request(1.0, 100, 5)], prefill=1, decode=1)
    _, _, c = run([Request(1.0, 100, 5)], prefill=1, decode=1, **hops)
    assert c["ttft"][0] == pytest.approx(plain["ttft"][0] + 0.010) and c["e2e"][0] == pytest.approx(plain["e2e"][0] + 0.010)
    assert c["itl_mean"][0] == pytest.approx(plain["itl_mean"][0])
    _, _, plain = run([Request(1.0, 100, 5)], colocated=1)
    _, _, c = run([Request(1.0, 100, 5)], colocated=1, **hops)
    assert c["ttft"][0] == pytest.approx(plain["ttft"][0] + 0.006) and c["e2e"][0] == pytest.approx(plain["e2e"][0] + 0.006)
    with pytest.raises(ValueError, match="hop latencies"):
        SimConfig(worker_hop=-0.001).check()


def test_two_requests_contend_for_one_decode_worker():
    # A's prefill runs 0-20 ms, B's 20-40 ms (B arrived while A's step was in flight). A lands at 25.112 ms and
    # decodes alone (11 ms steps); B lands at 45.112 ms, mid-way through A's second step, so it joins (and its
    # first token goes out) at 47.112; the batch of two steps 12 ms; A leaves after its fourth step, B finishes alone.
    sim, result, c = run([Request(0.0, 100, 5), Request(0.0, 100, 5)], prefill=1, decode=1)
    t_a = 0.020 + 0.005112
    join_b = t_a + 2 * 0.011
    assert c["ttft"].tolist() == pytest.approx([t_a, join_b])
    assert c["e2e"].tolist() == pytest.approx([join_b + 2 * 0.012, join_b + 2 * 0.012 + 2 * 0.011])
    assert_all_blocks_back(sim)


def test_a_reservation_is_answered_at_the_end_of_the_decode_step_in_flight():
    # A (100 tokens, 20 ms prefill) lands at 25.112 ms and decodes in 11 ms steps. B arrives at 30 ms,
    # during A's first step (25.112-36.112): the decode worker's engine thread answers B's reservation
    # only when that step ends, so B's prefill runs 36.112-56.112, not 30-50 (found against mock
    # clusters: tests/test_sim_validation.py). B lands at 61.224, mid-way through A's fourth step
    # (58.112-69.112: A's last, it ends there), and joins there, its first token out: 69.112.
    sim, result, c = run([Request(0.0, 100, 5), Request(0.030, 100, 5)], prefill=1, decode=1)
    t_a, step = 0.020 + 0.005112, 0.011
    assert c["ttft"].tolist() == pytest.approx([t_a, t_a + 4 * step - 0.030])  # (answered at once: 28.112 ms)
    assert_all_blocks_back(sim)


def test_colocated_request_alone():
    # One step computes the prompt and samples token 1; the next three steps (batch 1) the rest.
    sim, _, c = run([Request(0.0, 100, 4)], colocated=1)
    assert c["ttft"][0] == pytest.approx(0.020)
    assert c["e2e"][0] == pytest.approx(0.020 + 3 * 0.011)
    assert_all_blocks_back(sim)


def test_colocated_arrivals_within_a_step_spread_by_the_blocks_their_queued_prompts_will_take():
    # A (200 tokens: 13 of 1,000 blocks) starts on c0 at once. B-E (100 tokens: 7 blocks) arrive
    # during A's 30 ms step. B goes to idle c1 and starts there (7 blocks taken); C-E find c1
    # busy and queue. Ranked by free blocks alone, c1 (993 free) stayed ahead of c0 (987) however
    # many prompts it had queued, and took all four; counting a queued prompt's blocks as taken,
    # C goes to c1 (986 left as the router sees it), D to c0 (987 -> 980), E to c1 (986).
    requests = [Request(0.0, 200, 2)] + [Request(0.001 * i, 100, 2) for i in range(1, 5)]
    sim, _, c = run(requests, colocated=2, engine=EngineSpec(num_kv_blocks=1000))
    assert (c["status"] == "ok").all()
    assert sorted(w.prompt_tokens for w in sim.workers.values()) == [300, 300]
    assert_all_blocks_back(sim)


def test_no_room_for_kv_waits_then_times_out():
    # The pools have 10 blocks. A (100 prompt tokens) decodes from 25 ms on, holding 7 blocks, then 8; B
    # (48 tokens, 3 blocks) comes at 100 ms: taking its 3 would leave A no block to grow into, so the
    # router's view (router.policy.has_room) finds no worker for it until A finishes (19 decode steps
    # of 11 ms after it landed).
    engine = EngineSpec(num_kv_blocks=10)
    requests = [Request(0.0, 100, 20), Request(0.1, 48, 3)]
    sim, _, c = run(requests, prefill=1, decode=1, engine=engine)
    a_end = c["e2e"][0]
    assert a_end == pytest.approx(0.025112 + 19 * 0.011)
    assert c["status"].tolist() == ["ok", "ok"]
    b_prefill, b_transfer = 0.010 + 48e-4, 0.005 + 3 * 16_000 / 1e9
    assert 0.1 + c["ttft"][1] == pytest.approx(a_end + b_prefill + b_transfer)  # admitted as A finished
    assert_all_blocks_back(sim)
    _, _, c = run(requests, prefill=1, decode=1, engine=engine, admission_timeout=0.05)
    assert c["status"].tolist() == ["ok", "timeout"]


def test_full_queue_rejects():
    engine = EngineSpec(num_kv_blocks=10)
    requests = [Request(0.0, 100, 20), Request(0.1, 48, 3), Request(0.102, 48, 3)]
    _, _, c = run(requests, prefill=1, decode=1, engine=engine, max_waiting_requests=1)
    assert c["status"].tolist() == ["ok", "ok", "rejected"]


def test_preemption_recomputes_and_every_block_comes_back():
    # Two long replies in a decode pool too small for both: the newer one is preempted, recomputed on the
    # decode worker, and both finish with every token.
    engine = EngineSpec(num_kv_blocks=12)
    sim, _, c = run([Request(0.0, 40, 60), Request(0.0, 40, 60)], prefill=1, decode=1, engine=engine)
    assert c["status"].tolist() == ["ok", "ok"]
    assert sum(w.preemptions for w in sim.workers.values()) >= 1
    assert_all_blocks_back(sim)


def test_the_admission_queue_holds_256_by_default_as_the_routers():
    # RouterConfig.max_waiting_requests and `pdserve serve --max-waiting-requests` default to 256. A holds
    # the only decode worker's 10 blocks; 257 requests that find no room come at 100 ms: 256 wait (and are
    # served once A is done), the 257th is rejected.
    import argparse

    from simulator.cli import add_common_args

    parser = argparse.ArgumentParser()
    add_common_args(parser)
    assert SimConfig().max_waiting_requests == parser.parse_args([]).max_waiting_requests == 256
    requests = [Request(0.0, 100, 20)] + [Request(0.1, 48, 3)] * 257
    _, _, c = run(requests, prefill=1, decode=1, engine=EngineSpec(num_kv_blocks=10))
    assert (c["status"] == "ok").sum() == 257 and (c["status"] == "rejected").sum() == 1


def test_a_refused_reservation_waits_its_turn_again_at_the_front_of_the_queue():
    # Workers of 20 blocks, KV transfers of 1 s. A and E (239 tokens: 15 blocks) reserve at 0 on d1 and d2.
    # A's prompt is computed in 33.9 ms and lands on d1 at 1.0339 s, where A decodes in 11 ms steps; E's
    # prompt waits for p0's blocks (A's, until its transfer ends), so E's reservation sits on d2 until
    # 2.0678 s. As the router last heard, d1 (at 1.0339 s) and d2 each have 5 blocks free and one sequence:
    # C (64 tokens: 4 blocks) at 1.2 s asks d1 (the first by id). A holds 255 tokens by then (16 blocks):
    # d1 refuses, and its answer tells the router so. The router asks no other worker: C waits at the
    # head of the queue to be woken (nothing finishes) or for half a second, then takes d2 at 1.7 s; its
    # prefill (16.4 ms) and transfer land at 2.7164 s, d2 idle again (E finished at 2.0788), first token.
    requests = [Request(0.0, 239, 81), Request(0.0, 239, 2), Request(1.2, 64, 2)]
    sim, _, c = run(requests, profile=SlowTransfer(), prefill=1, decode=2, engine=EngineSpec(num_kv_blocks=20))
    assert c["status"].tolist() == ["ok", "ok", "ok"]
    assert c["ttft"][2] == pytest.approx(1.7 + 0.0164 + 1.0 - 1.2)
    assert_all_blocks_back(sim)


def test_a_timed_out_request_leaves_the_queue_and_the_next_takes_its_turn():
    # As in test_no_room_for_kv_waits_then_times_out, A decodes on the only decode worker (10 blocks) until
    # 234.112 ms and B (48 tokens, 3 blocks) finds no room at 100 ms. C (16 tokens, 1 block) at 101 ms would
    # fit, but queues behind B. B's wait (50 ms) ends at 150 ms: it leaves the queue (empty in the timeline at
    # 200 ms), and C, first now, reserves, answered at the end of A's step in flight (157.112 ms); its prefill
    # (11.6 ms) and transfer (5.016 ms) land at 173.728 ms, in A's 14th step, which C joins as it ends: 179.112 ms.
    requests = [Request(0.0, 100, 20), Request(0.1, 48, 3), Request(0.101, 16, 2)]
    sim, result, c = run(requests, prefill=1, decode=1, engine=EngineSpec(num_kv_blocks=10), admission_timeout=0.05, sample_interval=0.1)
    assert c["status"].tolist() == ["ok", "timeout", "ok"]
    assert 0.101 + c["ttft"][2] == pytest.approx(0.025112 + 14 * 0.011)
    assert [s["admission_queue"] for s in result.samples if s["t"] == 0.2] == [0]
    assert_all_blocks_back(sim)


def test_the_planner_and_the_timeline_see_the_routers_queued_prompt_tokens():
    # The router counts a prompt as queued on the prefill worker it sent it to until its KV is delivered,
    # and never on a colocated worker. At 22 ms A's 100-token prompt is computed (at 20 ms) and its
    # transfer under way (until 25.112 ms): 100 tokens queued on p0. Colocated, the same prompt in its
    # step (0-20 ms) at 10 ms: none.
    planner = Watcher(0.022)
    sim = Simulation(SimConfig(prefill=1, decode=1, sample_interval=0.022), FakeProfile(), planner)
    sim.run([Request(0.0, 100, 5)])
    assert planner.seen[0][0] == pytest.approx(0.022)
    assert [w.queued_tokens for w in planner.seen[0][1].pools["prefill"].workers] == [100]
    assert sim.samples[1]["t"] == pytest.approx(0.022) and sim.samples[1]["queued_prompt_tokens"] == 100
    planner = Watcher(0.010)
    sim = Simulation(SimConfig(colocated=1, sample_interval=0.010), FakeProfile(), planner)
    sim.run([Request(0.0, 100, 5)])
    assert [w.queued_tokens for w in planner.seen[0][1].pools["colocated"].workers] == [0]
    assert sim.samples[1]["queued_prompt_tokens"] == 0


def test_kv_usage_is_seen_at_the_decode_step_in_flight():
    # A (100 tokens, 200 out) joins the decode worker at 25.112 ms with 101 tokens (7 blocks) and decodes
    # in spans of 90 steps of 11 ms. At 0.5 s it is in its 44th step (43 done), holding 144 tokens: 9
    # blocks, as the planner's observation and the timeline see it (the real worker reports every step).
    planner = Watcher(0.5)
    sim = Simulation(SimConfig(prefill=1, decode=1, sample_interval=0.5), FakeProfile(), planner)
    sim.run([Request(0.0, 100, 200)])
    assert [w.kv_used_blocks for w in planner.seen[0][1].pools["decode"].workers] == [9]
    assert sim.samples[1]["t"] == 0.5 and sim.samples[1]["kv_usage"] == pytest.approx(9 / 100)
    # ...and the router's view of a worker, whenever it is brought up to date: at 0.475 s (43 steps done)
    w = SimWorker("d", Role.DECODE, EngineSpec().resolve(FakeProfile()), FakeProfile(), Sink())
    assert w.reserve(100, 0.0) and w.kv_arrived(seq(100, 199)) is None
    w.wake(0.0)
    w.sync_record(0.475)
    assert w.record.free_blocks == 100 - 9 and w.used_blocks(0.475) == 9


def test_shrinking_a_pool_drains_the_least_loaded_worker_first():
    # cluster._scale: the least loaded leave first (requests, then queued prompt tokens), the newest of
    # equals. A (2 tokens out) goes to d1, B (50 out) to d2; A is done at 36.112 ms, B decodes until
    # 584.112 ms. At 0.1 s the planner asks for one decode worker: idle d1 goes (at once), not d2, the newest.
    planner = Watcher(0.1, {"decode": 1})
    sim = Simulation(SimConfig(prefill=1, decode=2), FakeProfile(), planner)
    result = sim.run([Request(0.0, 100, 2), Request(0.0, 100, 50)])
    assert (result.columns.arrays()["status"] == "ok").all()
    assert sim.ended_at == {"d1": pytest.approx(0.1)}
    assert [w.id for w in sim.pools[Role.DECODE]] == ["d2"]


def test_kv_that_arrives_mid_step_keeps_its_reservation_until_it_joins():
    # A decodes alone (7 blocks) in 11 ms steps on a decode worker that holds at most 2 sequences. B's
    # reservation takes 7 blocks and its KV lands at 2 ms, in A's first step: the engine thread admits B
    # between steps, so until 11 ms its blocks stay reserved (100 - 7 - 7 = 86 free) and it counts as held
    # (a third reservation is refused: 2 sequences held); then B joins with the same 7 blocks.
    w = SimWorker("d", Role.DECODE, EngineSpec(max_num_seqs=2).resolve(FakeProfile()), FakeProfile(), Sink())
    assert w.reserve(100, 0.0) and w.kv_arrived(seq(100, 4)) is None
    w.wake(0.0)
    assert w.reserve(100, 0.001) and w.kv_arrived(seq(100, 4)) is None
    assert w.wake(0.002) == pytest.approx(0.011)  # the span cut to the step in flight
    assert w.free_blocks() == 86 and w.reserved == 1
    assert not w.reserve(16, 0.003)
    w.step_end(0.011)
    assert len(w.running) == 2 and w.reserved == 0 and w.free_blocks() == 86


def test_a_recomputed_sequence_reports_the_gap_since_its_last_token():
    # A decode worker of 4 blocks: A and B (16-token prompts) join at 0 with 17 tokens, 2 blocks each, and
    # decode 16 steps of 12 ms (batch 2) until their 33rd tokens need a third block each: at 192 ms B, the
    # newest, is preempted. A decodes alone to its end (4 steps of 11 ms, until 236 ms), then B's 33 tokens
    # are recomputed in one step (13.3 ms) that samples its next token at 249.3 ms: one gap of 57.3 ms
    # since its token at 192 ms, as the router measures it. Then its 13 last tokens, 11 ms apart.
    sink = Sink()
    w = SimWorker("d", Role.DECODE, EngineSpec(num_kv_blocks=4).resolve(FakeProfile()), FakeProfile(), sink)
    for steps in (20, 30):
        assert w.reserve(16, 0.0) and w.kv_arrived(seq(16, steps)) is None
    steps_until(w, w.wake(0.0), lambda: w.is_empty())
    gaps = [(round(t, 6), round(seconds, 6), n) for t, seconds, n in sink.itl]
    assert gaps == [(0.096, 0.012, 32), (0.1975, 0.011, 1), (0.2085, 0.011, 1), (0.2195, 0.011, 1), (0.2305, 0.011, 1),
                    (round((0.192 + 0.2493) / 2, 6), 0.0573, 1), (round(0.2493 + 13 * 0.011 / 2, 6), 0.011, 13)]  # fmt: skip


def test_a_colocated_worker_keeps_its_sequences_in_admission_order():
    # 77 blocks. A (1,100 tokens) is admitted first and computed in chunks of 512, 512 and 76; B (100
    # tokens) comes during A's first step, is admitted in the second and done there. When A's prompt is
    # done (151 ms), it keeps its place before B in the running list (the engine's, in admission order),
    # so when the pool runs short (at decode step 12: A 70 blocks, B 8) B, the newest, is preempted.
    w = SimWorker("c", Role.COLOCATED, EngineSpec(num_kv_blocks=77).resolve(FakeProfile()), FakeProfile(), Sink())
    a, b = seq(1100, 50), seq(100, 50)
    w.add_prompt(a)
    end = w.wake(0.0)
    w.add_prompt(b)
    end = steps_until(w, end, lambda: w.n_dec == 2)
    assert [s.req for s in w.running] == [a.req, b.req]
    steps_until(w, end, lambda: w.preemptions)
    assert w.waiting[0].req is b.req and [s.req for s in w.running] == [a.req]


def test_kv_blocks_from_the_profiles_capacity_round_up_as_the_engines():
    assert EngineSpec().resolve(dataclasses.replace(FakeProfile(), kv_capacity_tokens=1601)).num_kv_blocks == 101


def test_busy_run_loses_nothing():
    from benchmarks.workload import named

    for config in ({"prefill": 2, "decode": 3}, {"colocated": 3}):
        requests = list(named("interference", duration=20, seed=3, rate_scale=0.1).requests())
        engine = EngineSpec(num_kv_blocks=2000, max_num_seqs=32, max_num_batched_tokens=512)
        sim, result, c = run(requests, engine=engine, **config)
        assert (c["status"] == "ok").all()
        assert len(c["status"]) == len(requests)
        assert (c["e2e"] >= c["ttft"]).all() and (c["ttft"] > 0).all()
        assert_all_blocks_back(sim)
        if "prefill" in config:  # the router sends prompts to the prefill worker caching their system prompt
            assert sum(w.prefix_hit_tokens for w in sim.workers.values()) > 0


def test_the_planner_is_the_clusters(monkeypatch):
    """The simulator calls the cluster's Planner.decide (the class the cluster imports, not a copy) and
    actuates exactly the targets it returns."""
    import cluster.planner as planner_module
    from benchmarks.workload import Workload, Mix, Lengths

    returned = []
    original = planner_module.Planner.decide

    def spy(self, observation, now):
        decision = original(self, observation, now)
        returned.append(decision)
        return decision

    monkeypatch.setattr(planner_module.Planner, "decide", spy)
    config = planner_module.PlannerConfig(slo_ttft_ms=200, slo_itl_ms=30, interval=5, up_cooldown=5, down_cooldown=20,
                                          max_prefill=6, max_decode=6)  # fmt: skip
    planner = planner_module.Planner(config)
    load = Workload("step", 120, {"low": 1, "high": 60, "start": 20, "end": 70}, (Mix(1, Lengths(400), Lengths(40)),))
    engine = EngineSpec(num_kv_blocks=1000)
    # a queue that holds the step's first seconds (~400 wait while new workers start; the router's 256 rejects some)
    config = SimConfig(prefill=1, decode=1, slo_ttft_ms=200, slo_itl_ms=30, engine=engine, max_waiting_requests=1000)
    sim = Simulation(config, FakeProfile(), planner)
    result = sim.run(load.requests())
    assert returned, "the planner was never asked"
    recorded = [(d["at"], d["role"], d["target"], d["reason"]) for d in result.decisions]
    assert recorded == [(round(d.at, 6), p.role, p.target, p.reason) for d in returned for p in d.pools]
    grew = [d for d in result.decisions if d["direction"] == "up"]
    shrank = [d for d in result.decisions if d["direction"] == "down"]
    assert grew and shrank  # the step's load grows the pools, its end shrinks them back
    assert (result.columns.arrays()["status"] == "ok").all()
    assert_all_blocks_back(sim)
    assert max(s["pools"]["prefill"] + s["pools"]["decode"] for s in result.samples) > 2


def test_a_shard_stands_for_its_cluster():
    """One shard of 1/4 (2P/4D on a quarter of the arrivals), scaled back up, against the whole 8P/16D
    cluster on the same load: the cluster's counts are the shard's times 4, so requests, throughput,
    worker-seconds and pool sizes match the whole run's; the latencies are the shard's own, close
    to the whole cluster's here (its router picks among 6 workers instead of 24)."""
    from benchmarks import run_report
    from benchmarks.workload import Lengths, Mix, Workload
    from simulator.cli import run as run_cluster

    load = Workload("constant", 60, {"rate": 120}, (Mix(1, Lengths(200), Lengths(50)),), seed=1)
    config = SimConfig(prefill=8, decode=16, engine=EngineSpec(num_kv_blocks=2000))
    slo = {"ttft_ms": 1000, "itl_ms": 100}
    whole, shard = (run_cluster(config, FakeProfile(), load, shards=s) for s in (1, 4))
    w, s = (run_report.summarize(r.columns.arrays(), r.itl, slo, r.duration, r.worker_seconds, r.scale) for r in (whole, shard))
    assert shard.scale == 4 and shard.stats["requests"] == len(shard.columns) == s["requests"] / 4
    assert s["requests"] == pytest.approx(w["requests"], rel=0.05) and s["ok"] == s["requests"]
    assert s["throughput_rps"] == pytest.approx(w["throughput_rps"], rel=0.05)
    assert s["worker_seconds"] == pytest.approx(w["worker_seconds"], rel=0.02)
    assert {(x["pools"]["prefill"], x["pools"]["decode"]) for x in shard.samples} == {(8, 16)}
    assert s["ttft_ms"]["p50"] == pytest.approx(w["ttft_ms"]["p50"], rel=0.25) and s["itl_ms"]["p50"] == pytest.approx(w["itl_ms"]["p50"], rel=0.1)


def test_shards_divide_pools_and_the_planners_bounds():
    from cluster.planner import PlannerConfig
    from simulator.shards import shard_bounds, shard_config

    assert shard_config(SimConfig(prefill=4, decode=8), 4).pools == {"prefill": 1, "decode": 2}
    assert shard_config(SimConfig(colocated=6), 3).pools == {"colocated": 2}
    with pytest.raises(ValueError, match="must divide every pool"):
        shard_config(SimConfig(prefill=4, decode=6), 4)
    # the cluster's bounds round to multiples of 4 (prefill 4-8, decode 4-8), a shard holds a quarter; a
    # colocated bound (default max 8) is not this cluster's and is left alone
    config = PlannerConfig(min_prefill=3, max_prefill=9, min_decode=1, max_decode=8, max_colocated=3, max_step=6)
    bounds = shard_bounds(config, 4, ("prefill", "decode"))
    assert (bounds.min_prefill, bounds.max_prefill, bounds.min_decode, bounds.max_decode, bounds.max_step) == (1, 2, 1, 2, 1)
    assert bounds.max_colocated == 3
    with pytest.raises(ValueError, match="no room in a shard"):
        shard_bounds(PlannerConfig(max_prefill=3), 4, ("prefill", "decode"))


def test_a_shard_of_a_workload_keeps_a_random_share_of_its_arrivals(tmp_path):
    from benchmarks import workload as wl
    from simulator.shards import sample

    load = wl.Workload("constant", 100, {"rate": 40})
    assert len(list(sample(load, 4))) == pytest.approx(1000, rel=0.1)  # the rate divided by 4
    path = tmp_path / "trace.jsonl"
    wl.write_jsonl(load.requests(), str(path))
    trace = wl.Trace(str(path))
    everything, kept = list(trace.requests()), list(sample(trace, 4, seed=0))
    assert kept == list(sample(trace, 4, seed=0)) != list(sample(trace, 4, seed=1))  # seeded
    assert len(kept) == pytest.approx(len(everything) / 4, rel=0.1) and set(kept) <= set(everything)
    assert list(sample(trace, 1)) == everything


def test_simulator_imports_no_ray_grpc_torch_or_asyncio():
    code = ("import sys, simulator, simulator.simulation, simulator.cli, simulator.search, simulator.shards, benchmarks.run_report, "
            "benchmarks.workload, benchmarks.chrome_trace; "
            "print([m for m in ('torch', 'ray', 'grpc', 'asyncio') if m in sys.modules])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def needs_profiles():
    """The commands read the shipped cost profiles (engine/cost_model.py, benchmarks/profiles/)."""
    pytest.importorskip("engine.cost_model", reason="the cost model (issue 9's mock-engine branch) is not merged yet")


PDSERVE_SIM = ("import sys; from cluster.cli import main; main(sys.argv[1:]); "
               "assert not {'torch', 'ray'} & set(sys.modules), 'torch or ray was imported'")


def pdserve(*args):
    return subprocess.run([sys.executable, "-c", PDSERVE_SIM, *args], capture_output=True, text=True, timeout=600)


def test_pdserve_sim_end_to_end(tmp_path):
    needs_profiles()
    out, trace, plot, frozen = tmp_path / "run.json", tmp_path / "trace.json", tmp_path / "run.png", tmp_path / "w.jsonl"
    p = pdserve("sim", "--workload", "bursty", "--duration", "20", "--rate-scale", "0.2", "--prefill", "1", "--decode", "1",
                "--autoscale", "slo", "--max-prefill", "3", "--max-decode", "3", "--planner-interval", "5",
                "--planner-option", "down_cooldown=15", "--out", str(out), "--plot", str(plot), "--chrome-trace", str(trace), "--trace-seconds", "2",
                "--save-workload", str(frozen))  # fmt: skip
    assert p.returncode == 0, p.stderr
    report = json.loads(out.read_text())
    assert report["schema"] == "pdserve.run" and report["kind"] == "sim"
    assert report["summary"]["requests"] == len(frozen.read_text().splitlines()) > 0
    assert len(report["timeline"]) >= 20 and report["decisions"]
    assert report["config"]["planner"]["down_cooldown"] == 15.0
    assert plot.stat().st_size > 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e["ph"] == "X" and e["cat"] == "worker" for e in events) and any(e["ph"] == "X" and e["cat"] == "request" for e in events)
    # the frozen arrivals replay exactly
    replay = tmp_path / "replay.json"
    p = pdserve("sim", "--trace", str(frozen), "--prefill", "1", "--decode", "1", "--autoscale", "slo", "--max-prefill", "3",
                "--max-decode", "3", "--planner-interval", "5", "--out", str(replay))  # fmt: skip
    assert p.returncode == 0, p.stderr
    again = json.loads(replay.read_text())
    assert [r["arrival"] for r in again["requests"]] == [r["arrival"] for r in report["requests"]]
    assert again["summary"]["ttft_ms"] == pytest.approx(report["summary"]["ttft_ms"])
    p = pdserve("report", str(out), str(replay), "--plot", str(tmp_path / "both.png"))
    assert p.returncode == 0 and "SLO att." in p.stdout, p.stderr


def test_pdserve_sim_sharded_with_the_planner(tmp_path):
    # --shards 2: the planner runs on a shard (bounds 1-3 a pool), so every count the report gives
    # for the cluster is even: pools, targets, decisions, requests.
    needs_profiles()
    out = tmp_path / "run.json"
    p = pdserve("sim", "--workload", "bursty", "--duration", "30", "--rate-scale", "2", "--prefill", "2", "--decode", "2",
                "--shards", "2", "--autoscale", "slo", "--max-prefill", "6", "--max-decode", "6", "--planner-interval", "5",
                "--slo-ttft-ms", "20", "--slo-itl-ms", "5", "--out", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "one shard of 2" in p.stdout
    report = json.loads(out.read_text())
    assert report["config"]["shards"] == 2 and report["config"]["pools"] == {"prefill": 2, "decode": 2}
    assert report["config"]["planner"]["max_prefill"] == 6  # the cluster's bounds, as given
    assert report["summary"]["requests"] == 2 * report["sim_stats"]["requests"] == 2 * len(report["requests"]) > 0
    counts = [n for row in report["timeline"] for n in [*row["pools"].values(), *row["targets"].values()]]
    counts += [n for d in report["decisions"] for n in (d["current"], d["target"])]
    assert counts and all(n % 2 == 0 and 2 <= n <= 6 for n in counts)
    assert any(d["target"] > 2 for d in report["decisions"]), "an ITL SLO of 5 ms should grow the decode pool"
    p = pdserve("sim", "--prefill", "3", "--decode", "4", "--shards", "2", "--duration", "1")
    assert p.returncode == 2 and "--shards 2 must divide every pool; it does not divide {'prefill': 3}" in p.stderr


def test_pdserve_sim_search_end_to_end(tmp_path):
    needs_profiles()
    out = tmp_path / "search.json"
    p = pdserve("sim", "search", "--workers", "3", "--workload", "chat", "--duration", "10", "--iterations", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr
    result = json.loads(out.read_text())
    configs = {(r["prefill"], r["decode"], r["colocated"]) for r in result["rows"]}
    assert configs == {(1, 2, 0), (2, 1, 0), (0, 0, 3)}
    assert result["best"]["per_worker"] == max(r["per_worker"] for r in result["rows"]) > 0
    assert "best:" in p.stdout
    # --shards 2 on 6 workers searches a 3-worker shard: the same table, its pools and rates doubled
    sharded = tmp_path / "sharded.json"
    p = pdserve("sim", "search", "--workers", "6", "--shards", "2", "--workload", "chat", "--duration", "10", "--iterations", "1",
                "--json", str(sharded))  # fmt: skip
    assert p.returncode == 0, p.stderr
    doubled = [{**r, "prefill": 2 * r["prefill"], "decode": 2 * r["decode"], "colocated": 2 * r["colocated"], "max_rate": 2 * r["max_rate"]}
               for r in result["rows"]]  # fmt: skip
    for got, want in zip(json.loads(sharded.read_text())["rows"], doubled, strict=True):
        assert got == pytest.approx(want)


def test_the_oracle_holds_the_fewest_workers_whose_capacity_covers_the_rate():
    from simulator.oracle import follow

    capacities = {(1, 1): 10.0, (1, 2): 20.0, (2, 1): 12.0, (2, 2): 25.0}
    step = lambda t: 5.0 if t < 4 else 15.0 if t < 8 else 30.0  # noqa: E731 - the last 2 s exceed every pool
    r = follow(capacities, step, span=10.0, steps=1000)
    # 4 s on 1P/1D (2 workers), 4 s on 1P/2D (3: fewer than 2P/2D), 2 s uncovered on the largest, 2P/2D (4)
    assert r["worker_seconds"] == pytest.approx(2 * 4 + 3 * 4 + 4 * 2)
    assert r["uncovered_seconds"] == pytest.approx(2.0)


def test_pdserve_sim_oracle_end_to_end(tmp_path):
    needs_profiles()
    out = tmp_path / "oracle.json"
    p = pdserve("sim", "oracle", "--max-prefill", "1", "--max-decode", "2", "--workload", "diurnal", "--time-scale", "0.01",
                "--rate-scale", "0.01", "--iterations", "1", "--capacity-duration", "3", "--json", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert [(c["prefill"], c["decode"]) for c in r["capacities"]] == [(1, 1), (1, 2)] and all(c["max_rate"] > 0 for c in r["capacities"])
    assert r["span_s"] == pytest.approx(12.0) and r["static_max_worker_seconds"] == pytest.approx(36.0)
    assert 2 * r["span_s"] <= r["worker_seconds"] <= r["static_max_worker_seconds"]  # between the smallest pool and the largest
    assert r["share_of_static_max"] == pytest.approx(r["worker_seconds"] / 36.0) and "oracle:" in p.stdout
    assert pdserve("sim", "oracle", "--max-prefill", "1", "--max-decode", "1", "--trace", "x.jsonl").returncode == 2


def test_worker_counts_blocks_as_the_allocator_would():
    """The decode batch's blocks, counted from length residues, equal the sum of ceil(len / 16)."""
    import random

    from router.workers import Role
    from simulator.worker import PROMPT, Seq

    w = SimWorker("d", Role.DECODE, EngineSpec(num_kv_blocks=10_000).resolve(FakeProfile()), FakeProfile(), None)
    rng, seqs = random.Random(0), []
    for _ in range(40):
        w.dstep = rng.randrange(0, 200)
        seq = Seq(None, PROMPT, 0, 0)
        w._join(seq, rng.randrange(1, 500), rng.randrange(1, 300))
        seqs.append(seq)
        for step in range(w.dstep, w.dstep + 20):
            assert w._dec_blocks(step) == sum(-(-(s.base + step) // 16) for s in seqs)


def test_pdserve_sim_compare(tmp_path):
    needs_profiles()
    from simulator import cli

    reports = cli.main(["--workload", "chat", "--duration", "10", "--rate-scale", "0.2", "--autoscale", "slo", "--max-prefill", "2",
                        "--max-decode", "2", "--static", "1:2,3C", "--compare", str(tmp_path)])  # fmt: skip
    assert list(reports) == ["static-min", "static-max", "static-1P2", "static-3C", "slo", "predictive"]
    assert reports["static-max"]["config"]["pools"] == {"prefill": 2, "decode": 2}
    assert reports["static-3C"]["config"]["pools"] == {"colocated": 3}
    assert reports["predictive"]["config"]["planner"]["policy"] == "predictive"
    arrivals = {label: [r["arrival"] for r in rep["requests"]] for label, rep in reports.items()}
    assert len({tuple(a) for a in arrivals.values()}) == 1  # the same arrivals for every run
    assert (tmp_path / "compare.png").stat().st_size > 0 and (tmp_path / "slo.json").exists()

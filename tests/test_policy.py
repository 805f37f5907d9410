"""Routing policies: decode by room and free blocks, prefill by cached prefix under a load bound."""

import random

from router.policy import Balance, PrefixIndex, choose_prefill, decode_order, has_room
from router.workers import Role, WorkerRecord, WorkerState

BS = 4


def worker(name, role=Role.PREFILL, queued=0, free=0, running=0, state=WorkerState.READY, max_num_seqs=0):
    return WorkerRecord(name, role, handle=None, state=state, queued_tokens=queued, free_blocks=free, running=running,
                        max_num_seqs=max_num_seqs)  # fmt: skip


def matched(index, worker_id, hashes):
    """How many of `hashes`, from the start, the index has for the worker (read from its LRU itself)."""
    held, n = index._held.get(worker_id, {}), 0
    while n < len(hashes) and hashes[n] in held:
        n += 1
    return n


def prompt(prefix_blocks, suffix=0, base=100):
    return list(range(base, base + prefix_blocks * BS)) + list(range(9000, 9000 + suffix))


def test_decode_order_prefers_free_blocks_then_fewest_running_and_skips_draining():
    ws = [worker("a", Role.DECODE, free=10, running=1), worker("b", Role.DECODE, free=30, running=5),
          worker("c", Role.DECODE, free=30, running=2), worker("d", Role.DECODE, free=99, state=WorkerState.DRAINING)]  # fmt: skip
    assert [w.id for w in decode_order(ws)] == ["c", "b", "a"]


def test_reservations_in_flight_count_against_a_worker_so_simultaneous_arrivals_alternate():
    a, b = worker("a", Role.DECODE, free=100), worker("b", Role.DECODE, free=100)
    placed = []
    for _ in range(6):  # nothing is answered (or reported) meanwhile
        best = next(decode_order([a, b], blocks=2))
        best.pending += 1
        best.pending_blocks += 2
        placed.append(best.id)
    assert placed == ["a", "b", "a", "b", "a", "b"]


def test_pools_of_different_sizes_fill_by_share_not_by_count():
    """Pools sized from the memory each worker found free differ by tens of blocks: 20 one-block
    requests at once go to both, about in proportion to their size, not all to the larger."""
    a, b = worker("a", Role.DECODE, free=1000), worker("b", Role.DECODE, free=1040)
    a.total_blocks, b.total_blocks = 1000, 1040
    placed = []
    for _ in range(20):
        best = next(decode_order([a, b], blocks=1))
        best.pending += 1
        best.pending_blocks += 1
        placed.append(best.id)
    assert placed.count("a") in (9, 10) and placed.count("b") in (10, 11)


def test_room_leaves_each_sequence_a_block_to_grow_into_and_respects_max_num_seqs():
    w = worker("w", Role.DECODE, free=10, running=3, max_num_seqs=5)
    assert has_room(w, 7) and not has_room(w, 8)  # 10 - 7 >= 3 sequences; 10 - 8 < 3
    w.pending, w.pending_blocks = 1, 4
    assert has_room(w, 2) and not has_room(w, 3)  # 10 - 4 - 2 >= 4
    w.pending = 2
    assert not has_room(w, 0)  # 3 + 2 = max_num_seqs
    assert list(decode_order([w], 0)) == []
    colocated = worker("c", Role.COLOCATED, free=0, running=3, max_num_seqs=5)
    assert has_room(colocated, 100)  # its engine queues (and preempts) what does not fit


def test_prefill_goes_where_the_longest_prefix_is_cached():
    index = PrefixIndex(BS)
    a, b = worker("a", queued=100), worker("b", queued=0)
    index.record("a", index.hashes(prompt(8)))
    index.record("b", index.hashes(prompt(3)))
    assert choose_prefill([a, b], index.hashes(prompt(8, suffix=5)), index) is a
    assert matched(index, "a", index.hashes(prompt(8, suffix=5))) == 8
    assert matched(index, "b", index.hashes(prompt(8, suffix=5))) == 3


def test_no_cached_prefix_means_fewest_queued_tokens():
    index = PrefixIndex(BS)
    a, b = worker("a", queued=500), worker("b", queued=20)
    assert choose_prefill([a, b], index.hashes(prompt(5)), index) is b


def test_a_hot_prefix_does_not_pile_everything_on_one_worker():
    index = PrefixIndex(BS)
    hot = index.hashes(prompt(16))
    a, b = worker("a"), worker("b")
    index.record("a", hot)
    balance = Balance(abs_tokens=1000, rel=1.5)
    a.queued_tokens = 900  # ahead, but within the absolute bound: affinity wins
    assert choose_prefill([a, b], hot, index, balance) is a
    a.queued_tokens, b.queued_tokens = 5000, 3800  # beyond the absolute bound, within the relative one
    assert choose_prefill([a, b], hot, index, balance) is a
    b.queued_tokens = 200  # beyond both: the request goes to the idle worker
    assert choose_prefill([a, b], hot, index, balance) is b


def test_index_is_bounded_least_recently_used_first():
    index = PrefixIndex(BS)
    index.set_capacity("a", 4)
    old, new = index.hashes(prompt(3, base=100)), index.hashes(prompt(3, base=500))
    index.record("a", old)
    index.record("a", new)  # 6 blocks into 4: the old prompt's first two are forgotten
    assert matched(index, "a", old) == 0 and matched(index, "a", new) == 3
    index.forget("a")
    assert matched(index, "a", new) == 0


def test_draining_prefill_workers_are_chosen_only_when_all_are_and_dead_ones_never():
    index = PrefixIndex(BS)
    hashes = index.hashes(prompt(4))
    index.record("a", hashes)
    a, b = worker("a", state=WorkerState.DRAINING), worker("b", queued=10_000)
    assert choose_prefill([a, b], hashes, index) is b
    assert choose_prefill([a, worker("x", state=WorkerState.DEAD)], hashes, index) is a  # the whole cluster drains
    assert choose_prefill([worker("x", state=WorkerState.DEAD)], hashes, index) is None


def test_the_holder_index_gives_the_choice_a_scan_of_every_worker_gives():
    """choose_prefill finds the longest cached prefix through the index's holders per block hash (kept
    through eviction and forget); a scan of every worker's own LRU, the rule as the module states it,
    must pick the same worker."""
    rng = random.Random(7)
    index = PrefixIndex(BS)
    ws = [worker(f"w{i}", queued=rng.randrange(0, 6000)) for i in range(12)]
    prompts = [prompt(rng.randrange(0, 6), suffix=rng.randrange(0, 9), base=rng.choice([100, 300, 700])) for _ in range(40)]

    def by_scan(hashes):
        ready = [w for w in ws if w.takes_work]
        least = min(ready, key=lambda w: (w.queued_tokens, len(w.requests), w.id))
        best = max(ready, key=lambda w: (matched(index, w.id, hashes), -w.queued_tokens, -len(w.requests), w.id))
        if matched(index, best.id, hashes) == 0:
            return least
        far = best.queued_tokens - least.queued_tokens > Balance().abs_tokens and best.queued_tokens > Balance().rel * least.queued_tokens
        return least if far else best

    for step in range(400):
        w, hashes = rng.choice(ws), index.hashes(rng.choice(prompts))
        if step % 37 == 0:
            index.forget(w.id)
        index.set_capacity(w.id, rng.randrange(1, 12))
        index.record(w.id, hashes)
        w.queued_tokens = rng.randrange(0, 6000)
        for h in index.hashes(rng.choice(prompts)):
            assert index.holders(h) == {x.id for x in ws if matched(index, x.id, [h])}
        asked = index.hashes(rng.choice(prompts))
        assert choose_prefill(ws, asked, index) is by_scan(asked)

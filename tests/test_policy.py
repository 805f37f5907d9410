"""Routing policies: decode by room and free blocks, prefill by cached prefix under a load bound."""

from router.policy import Balance, PrefixIndex, choose_prefill, decode_order, has_room
from router.workers import Role, WorkerRecord, WorkerState

BS = 4


def worker(name, role=Role.PREFILL, queued=0, free=0, running=0, state=WorkerState.READY, max_num_seqs=0):
    return WorkerRecord(name, role, handle=None, state=state, queued_tokens=queued, free_blocks=free, running=running,
                        max_num_seqs=max_num_seqs)  # fmt: skip


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
        best = decode_order([a, b], blocks=2)[0]
        best.pending += 1
        best.pending_blocks += 2
        placed.append(best.id)
    assert placed == ["a", "b", "a", "b", "a", "b"]


def test_room_leaves_each_sequence_a_block_to_grow_into_and_respects_max_num_seqs():
    w = worker("w", Role.DECODE, free=10, running=3, max_num_seqs=5)
    assert has_room(w, 7) and not has_room(w, 8)  # 10 - 7 >= 3 sequences; 10 - 8 < 3
    w.pending, w.pending_blocks = 1, 4
    assert has_room(w, 2) and not has_room(w, 3)  # 10 - 4 - 2 >= 4
    w.pending = 2
    assert not has_room(w, 0)  # 3 + 2 = max_num_seqs
    assert decode_order([w], 0) == []
    colocated = worker("c", Role.COLOCATED, free=0, running=3, max_num_seqs=5)
    assert has_room(colocated, 100)  # its engine queues (and preempts) what does not fit


def test_prefill_goes_where_the_longest_prefix_is_cached():
    index = PrefixIndex(BS)
    a, b = worker("a", queued=100), worker("b", queued=0)
    index.record("a", index.hashes(prompt(8)))
    index.record("b", index.hashes(prompt(3)))
    assert choose_prefill([a, b], index.hashes(prompt(8, suffix=5)), index) is a
    assert index.matched_blocks("a", index.hashes(prompt(8, suffix=5))) == 8
    assert index.matched_blocks("b", index.hashes(prompt(8, suffix=5))) == 3


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
    assert index.matched_blocks("a", old) == 0 and index.matched_blocks("a", new) == 3
    index.forget("a")
    assert index.matched_blocks("a", new) == 0


def test_draining_prefill_workers_are_chosen_only_when_all_are_and_dead_ones_never():
    index = PrefixIndex(BS)
    hashes = index.hashes(prompt(4))
    index.record("a", hashes)
    a, b = worker("a", state=WorkerState.DRAINING), worker("b", queued=10_000)
    assert choose_prefill([a, b], hashes, index) is b
    assert choose_prefill([a, worker("x", state=WorkerState.DEAD)], hashes, index) is a  # the whole cluster drains
    assert choose_prefill([worker("x", state=WorkerState.DEAD)], hashes, index) is None

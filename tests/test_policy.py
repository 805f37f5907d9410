"""Routing policies: decode by free blocks, prefill by cached prefix under a load bound."""

from router.policy import Balance, PrefixIndex, choose_prefill, decode_order
from router.workers import Role, WorkerRecord, WorkerState

BS = 4


def worker(name, role=Role.PREFILL, queued=0, free=0, running=0, state=WorkerState.READY):
    return WorkerRecord(name, role, handle=None, state=state, queued_tokens=queued, free_blocks=free, running=running)


def prompt(prefix_blocks, suffix=0, base=100):
    return list(range(base, base + prefix_blocks * BS)) + list(range(9000, 9000 + suffix))


def test_decode_order_prefers_free_blocks_then_fewest_running_and_skips_draining():
    ws = [worker("a", Role.DECODE, free=10, running=1), worker("b", Role.DECODE, free=30, running=5),
          worker("c", Role.DECODE, free=30, running=2), worker("d", Role.DECODE, free=99, state=WorkerState.DRAINING)]  # fmt: skip
    assert [w.id for w in decode_order(ws)] == ["c", "b", "a"]


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


def test_draining_or_dead_prefill_workers_are_never_chosen():
    index = PrefixIndex(BS)
    hashes = index.hashes(prompt(4))
    index.record("a", hashes)
    a, b = worker("a", state=WorkerState.DRAINING), worker("b", queued=10_000)
    assert choose_prefill([a, b], hashes, index) is b
    assert choose_prefill([worker("x", state=WorkerState.DEAD)], hashes, index) is None

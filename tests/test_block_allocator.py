"""BlockAllocator: exact block ids, reference counts, eviction order; the pool is whole again
after every scenario."""

import pytest

from engine.block_allocator import BlockAllocator, hash_blocks

BS = 4


@pytest.fixture
def alloc():
    a = BlockAllocator(num_blocks=11, block_size=BS)
    yield a
    # every scenario ends with all references dropped: nothing in use, invariants hold
    a.check_invariants(expected_in_use=0)
    assert a.num_in_use == 0 and a.num_free == 11


def tokens(n, start=0):
    return list(range(start, start + n))


def cache_seq(a, blocks, token_ids):
    """Register a sequence's full blocks as its prefix, as the scheduler does after computing them."""
    a.cache(blocks, hash_blocks(token_ids, BS), token_ids)


def test_allocate_hands_out_lowest_ids_first_and_free_returns_them(alloc):
    x = alloc.allocate(3)
    y = alloc.allocate(2)
    assert (x, y) == ([0, 1, 2], [3, 4])
    assert [alloc.ref_count(b) for b in range(6)] == [1, 1, 1, 1, 1, 0]
    alloc.check_invariants(expected_in_use=5)
    alloc.free(x)
    assert alloc.num_free == 9 and alloc.num_in_use == 2
    alloc.free(y)
    # freed blocks holding no cached prefix first (their memory is written), the last freed first,
    # each sequence head first; then the never-used ones
    assert alloc.allocate(11) == [3, 4, 0, 1, 2, 5, 6, 7, 8, 9, 10]
    alloc.free(list(range(11)))


def test_allocate_more_than_free_raises_and_changes_nothing(alloc):
    held = alloc.allocate(10)
    with pytest.raises(MemoryError, match="asked for 2 KV blocks, 1 free"):
        alloc.allocate(2)
    alloc.check_invariants(expected_in_use=10)
    alloc.free(held)


def test_double_free_is_an_error(alloc):
    b = alloc.allocate(1)
    alloc.free(b)
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(b)


def test_prefix_hit_shares_blocks_with_ref_counts(alloc):
    prompt = tokens(10)  # two full blocks + 2 tokens
    first = alloc.allocate(3)
    cache_seq(alloc, first, prompt)
    assert alloc.num_cached == 0  # referenced blocks are in use, not cached

    second_prompt = tokens(8) + [99, 98, 97]
    hit = alloc.match_prefix(hash_blocks(second_prompt, BS), second_prompt)
    assert hit == [0, 1]
    alloc.share(hit)
    second = hit + alloc.allocate(1)
    assert second == [0, 1, 3]
    assert [alloc.ref_count(b) for b in (0, 1, 2, 3)] == [2, 2, 1, 1]

    alloc.free(first)
    assert [alloc.ref_count(b) for b in (0, 1, 2, 3)] == [1, 1, 0, 1]
    alloc.free(second)
    assert alloc.num_cached == 2  # blocks 0 and 1 keep their prefix, evictable


def test_reset_prefix_cache_forgets_evictable_prefixes_and_keeps_those_in_use(alloc):
    done, live = tokens(8), tokens(8, start=100)
    a, b = alloc.allocate(2), alloc.allocate(2)
    cache_seq(alloc, a, done)
    cache_seq(alloc, b, live)
    alloc.free(a)
    assert alloc.num_cached == 2
    assert alloc.reset_prefix_cache() == 2
    assert alloc.num_cached == 0 and alloc.match_prefix(hash_blocks(done, BS), done) == []
    assert alloc.match_prefix(hash_blocks(live, BS), live) == b  # still held: its prefix stays
    alloc.check_invariants(expected_in_use=2)
    assert alloc.allocate(2) == a  # forgotten, they hold nothing reusable: taken before never-used blocks
    alloc.free(b + a)


def test_cached_blocks_survive_free_and_are_reused_without_recompute(alloc):
    prompt = tokens(12)
    blocks = alloc.allocate(3)
    cache_seq(alloc, blocks, prompt)
    alloc.free(blocks)
    assert alloc.num_cached == 3 and alloc.num_free == 11

    hit = alloc.match_prefix(hash_blocks(prompt, BS), prompt)
    assert hit == [0, 1, 2]
    alloc.share(hit)
    assert alloc.num_free == 8
    alloc.free(hit)


def test_match_stops_at_first_difference_and_checks_parent_chain(alloc):
    prompt = tokens(12)
    blocks = alloc.allocate(3)
    cache_seq(alloc, blocks, prompt)
    other = tokens(4) + [50, 51, 52, 53] + tokens(4, start=8)  # 3rd block equal, but its prefix differs
    assert alloc.match_prefix(hash_blocks(other, BS), other) == [0]
    partial = tokens(6)  # a partial block never matches
    assert alloc.match_prefix(hash_blocks(partial, BS), partial) == [0]
    alloc.free(blocks)


def test_eviction_is_least_recently_used_and_tail_first(alloc):
    a_prompt, b_prompt = tokens(8), tokens(8, start=100)
    a = alloc.allocate(2)  # blocks 0, 1
    b = alloc.allocate(2)  # blocks 2, 3
    cache_seq(alloc, a, a_prompt)
    cache_seq(alloc, b, b_prompt)
    alloc.free(a)  # A used longer ago than B
    alloc.free(b)
    # Fresh blocks go first, then the LRU cached ones: A's tail (1), A's head (0), B's tail (3)...
    fresh = alloc.allocate(7)
    assert fresh == [4, 5, 6, 7, 8, 9, 10]
    assert alloc.allocate(3) == [1, 0, 3]
    assert alloc.match_prefix(hash_blocks(a_prompt, BS), a_prompt) == []
    assert alloc.match_prefix(hash_blocks(b_prompt, BS), b_prompt) == [2]  # B's head survived
    alloc.free(fresh + [1, 0, 3])


def test_touching_a_cached_block_makes_it_most_recently_used(alloc):
    a_prompt, b_prompt = tokens(4), tokens(4, start=100)
    a, b = alloc.allocate(1), alloc.allocate(1)
    cache_seq(alloc, a, a_prompt)
    cache_seq(alloc, b, b_prompt)
    alloc.free(a)
    alloc.free(b)
    hit = alloc.match_prefix(hash_blocks(a_prompt, BS), a_prompt)  # reuse A: now newer than B
    alloc.share(hit)
    alloc.free(hit)
    rest = alloc.allocate(9)  # the never-used blocks
    assert alloc.allocate(1) == b  # B is now the least recently used
    alloc.free(rest + b)


def test_same_prefix_in_two_blocks_is_cached_once(alloc):
    prompt = tokens(4)
    x, y = alloc.allocate(1), alloc.allocate(1)
    cache_seq(alloc, x, prompt)
    cache_seq(alloc, y, prompt)  # computed twice (e.g. two requests at once): keep the first
    assert alloc.match_prefix(hash_blocks(prompt, BS), prompt) == x
    alloc.free(x + y)
    assert alloc.num_cached == 1


def test_caching_disabled_never_matches():
    a = BlockAllocator(num_blocks=4, block_size=BS, enable_caching=False)
    blocks = a.allocate(2)
    cache_seq(a, blocks, tokens(8))
    a.free(blocks)
    assert a.match_prefix(hash_blocks(tokens(8), BS), tokens(8)) == [] and a.num_cached == 0
    a.check_invariants(expected_in_use=0)


def test_invariant_check_catches_a_leak(alloc):
    held = alloc.allocate(2)
    with pytest.raises(AssertionError, match="2 block references held, owners account for 1"):
        alloc.check_invariants(expected_in_use=1)
    alloc.free(held)

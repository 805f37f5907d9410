"""Scheduler + BlockAllocator without a model: what each step computes, who owns which block."""

import pytest

from engine.block_allocator import BlockAllocator
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, Sequence, SequenceStatus

BS = 4
EOS = 2
PARAMS = SamplingParams(temperature=0, max_tokens=100)


def make_scheduler(num_blocks=64, budget=16, max_num_seqs=8, **options):
    options.setdefault("chunk_size", budget)
    config = EngineConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=4096, **options)
    return Scheduler(config, BlockAllocator(num_blocks, BS, config.enable_prefix_caching), (EOS,))


def add(sched, rid, n_tokens, params=PARAMS, first=10):
    seq = Sequence(rid, list(range(first, first + n_tokens)), params)
    sched.add(seq)
    return seq


def step(sched, token=7):
    """Schedule, pretend to run, feed `token` to every sequence that samples. Returns
    {request_id: tokens computed this step}."""
    batch = sched.schedule()
    plan = {s.request_id: s.num_scheduled_tokens for s in batch.seqs}
    n_sampling = sum(1 for s in batch.seqs if s.num_computed_tokens + s.num_scheduled_tokens == len(s))
    sched.postprocess(batch, [token] * n_sampling)
    sched.check_invariants()
    return plan


def test_a_new_prompt_is_computed_in_the_step_that_admits_it():
    sched = make_scheduler()
    seq = add(sched, "a", 10)
    assert step(sched) == {"a": 10}
    assert seq.status is SequenceStatus.RUNNING and seq.output_token_ids == [7]
    assert seq.block_table == [0, 1, 2]
    assert step(sched) == {"a": 1}


def test_long_prompt_is_chunked_and_decodes_go_first():
    sched = make_scheduler(budget=16)
    add(sched, "short", 3)
    step(sched)  # "short" is decoding from now on
    long = add(sched, "long", 40)
    assert step(sched) == {"short": 1, "long": 15}
    assert step(sched) == {"short": 1, "long": 15}
    assert step(sched) == {"short": 1, "long": 10}  # last chunk: samples its first token
    assert long.output_token_ids == [7] and sched.stats.chunked_prefill_steps == 2
    assert [s.request_id for s in sched.schedule().seqs] == ["short", "long"]


def test_chunk_size_caps_one_prompt_per_step():
    sched = make_scheduler(budget=16, chunk_size=6)
    add(sched, "a", 10)
    add(sched, "b", 10)
    assert step(sched) == {"a": 6, "b": 6}
    assert step(sched) == {"a": 4, "b": 4}


def test_without_chunking_prompts_run_whole_and_first():
    sched = make_scheduler(budget=16, enable_chunked_prefill=False)
    add(sched, "small", 5)
    add(sched, "big", 40, first=100)
    assert step(sched) == {"small": 5}  # big does not fit beside it: waits
    assert step(sched) == {"big": 40}  # first in the step, whole, past the budget: the decode waits
    assert step(sched) == {"small": 1, "big": 1}
    add(sched, "next", 6, first=300)
    assert step(sched) == {"next": 6, "small": 1, "big": 1}  # prompts first, decodes in what is left


def test_second_request_sharing_a_1024_token_prefix_computes_only_its_suffix():
    sched = make_scheduler(num_blocks=1024, budget=2048)
    prefix = list(range(100, 1124))
    first = Sequence("first", prefix + [1, 2, 3], PARAMS)
    second = Sequence("second", prefix + [4, 5, 6, 7, 8], PARAMS)
    sched.add(first)
    assert step(sched) == {"first": 1027}
    sched.add(second)
    assert step(sched) == {"first": 1, "second": 5}
    assert second.num_cached_tokens == 1024
    assert second.block_table[:256] == first.block_table[:256]  # shared, by reference
    assert sched.stats.prefix_query_tokens == 1027 + 1029 and sched.stats.prefix_hit_tokens == 1024


def test_fully_cached_prompt_still_computes_its_last_block():
    sched = make_scheduler()
    add(sched, "a", 8)
    step(sched)
    sched.abort("a")
    b = add(sched, "b", 8)
    assert step(sched) == {"b": 4}  # block 0 from cache; block 1 recomputed for the logits
    assert b.num_cached_tokens == 4


def test_prefix_caching_off_recomputes_everything():
    sched = make_scheduler(enable_prefix_caching=False)
    add(sched, "a", 12)
    step(sched)
    add(sched, "b", 12)
    assert step(sched) == {"a": 1, "b": 12}
    assert sched.stats.prefix_hit_tokens == 0


def test_pool_exhaustion_preempts_the_newest_and_recomputes_it_later():
    sched = make_scheduler(num_blocks=6, budget=32, enable_prefix_caching=False)
    add(sched, "old", 8)  # 2 blocks; a 3rd for its 9th token
    new = add(sched, "new", 12, first=50)  # 3 blocks; a 4th for its 13th token
    assert sched.waiting_blocks == 5  # what the router leaves out of a worker's free blocks
    assert step(sched) == {"old": 8, "new": 12}  # 5 of 6 blocks
    assert sched.waiting_blocks == 0
    # old takes the last free block; new needs one too and none is left: the newest running
    # sequence not already in the batch is new itself, so it is preempted.
    assert step(sched) == {"old": 1}
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and sched.stats.preemptions == 1
    assert new.output_token_ids == [7]  # its output is kept and will be recomputed
    assert sched.waiting_blocks == 4  # its 13 tokens, once readmitted
    assert step(sched) == {"old": 1}  # new needs 4 blocks, 3 are free: it keeps waiting
    sched.abort("old")
    assert step(sched) == {"new": 13}  # prompt + output recomputed in one chunk, then it samples
    assert new.output_token_ids == [7, 7] and new.num_computed_tokens == 13


def test_preemption_never_picks_a_sequence_already_in_the_batch():
    sched = make_scheduler(num_blocks=2, budget=16, chunk_size=4, enable_prefix_caching=False)
    older = add(sched, "older", 12)
    newer = add(sched, "newer", 3, first=40)
    assert step(sched) == {"older": 4, "newer": 3}  # both blocks taken
    # Decodes are scheduled first, so "newer" is already in the batch when "older" needs a block
    # for its next chunk: "newer" must not be the victim; "older" preempts itself.
    assert step(sched) == {"newer": 1}
    assert older.status is SequenceStatus.WAITING and older.block_table == []
    assert newer.block_table == [1] and newer.num_computed_tokens == 4
    # not re-admitted while the pool is short: "newer" takes the freed block for its 5th token
    assert step(sched) == {"newer": 1}
    assert newer.block_table == [1, 0] and older.status is SequenceStatus.WAITING


def test_reserve_refuses_when_running_or_reserved_sequences_could_not_grow():
    """A reserved sequence runs once its KV lands: a block is kept for it to grow into too, or its
    first step would preempt a sequence whose KV was just transferred (and recompute it)."""
    sched = make_scheduler(num_blocks=8)
    add(sched, "a", 3)
    step(sched)
    assert sched.reserve("r1", 20) == [1, 2, 3, 4, 5]
    assert sched.reserve("r2", 12) is None  # 3 of the 2 free blocks
    assert sched.reserve("r2", 4) is None  # would leave one block for "a" and "r1" to grow into
    sched.abort("r1")
    assert sched.reserve("r2", 20) == [1, 2, 3, 4, 5]  # leaves one for "a" and one for "r2"
    assert sched.reserve("r3", 4) is None
    sched.abort("r2")
    sched.check_invariants()
    assert sched.allocator.num_in_use == 1  # only "a"


def test_prefilled_sequence_joins_with_its_first_token_and_stops_on_eos():
    sched = make_scheduler()
    blocks = sched.reserve("d", 10)
    seq = Sequence("d", list(range(10, 20)), PARAMS)
    sched.add_prefilled(seq, first_token=9)
    assert seq.block_table == blocks and seq.num_computed_tokens == 10
    assert step(sched) == {"d": 1}
    eos = Sequence("e", list(range(10, 14)), PARAMS)
    sched.reserve("e", 4)
    sched.add_prefilled(eos, first_token=EOS)
    assert eos.finish_reason.value == "stop" and eos.block_table == []
    with pytest.raises(KeyError, match="no reservation"):
        sched.add_prefilled(Sequence("x", [1, 2], PARAMS), 3)


def test_a_transferred_prompt_is_prefix_cache_as_soon_as_it_lands():
    """Before its first step: a sequence preempted then finds it (not recomputes what a prefill
    worker computed and sent), and so does a prompt sharing it."""
    sched = make_scheduler()
    sched.reserve("d", 12)
    sched.add_prefilled(Sequence("d", list(range(10, 22)), PARAMS), first_token=9)
    add(sched, "x", 13)  # the same 12 tokens, and one more
    assert step(sched) == {"d": 1, "x": 1} and sched.stats.prefix_hit_tokens == 12


def test_a_stop_string_on_a_sequence_preempted_since_its_last_token_ends_it_there():
    """LLMEngine finishes a sequence on a stop string after the step that preempted it: it leaves
    the queue (it was left there, finished, to be computed again)."""
    sched = make_scheduler(num_blocks=4, budget=16)
    add(sched, "a", 4)
    b = add(sched, "b", 4, first=30)
    for _ in range(6):  # the fourth block goes at position 4; at position 8 both need another, none is free
        step(sched)
    assert b.status is SequenceStatus.WAITING and sched.waiting_blocks == 3
    sched.finish(b, FinishReason.STOP)
    assert list(sched.waiting) == [] and sched.waiting_blocks == 0 and "b" not in sched.requests
    assert step(sched) == {"a": 1}
    sched.check_invariants()


def test_reserved_sequences_count_against_max_num_seqs_when_admitting():
    sched = make_scheduler(max_num_seqs=2, budget=2)
    add(sched, "a", 2)
    step(sched)
    assert sched.reserve("r", 4) is not None  # "a" running + "r" reserved: the batch is full
    add(sched, "w", 2, first=40)
    assert step(sched) == {"a": 1}  # "w" waits: "r" runs once its KV lands
    sched.add_prefilled(Sequence("r", [9, 9, 9, 9], PARAMS), 3)
    assert len(sched.running) == 2 and step(sched) == {"a": 1, "r": 1}


def test_duplicate_request_id_is_refused():
    sched = make_scheduler()
    add(sched, "a", 3)
    with pytest.raises(ValueError, match="already in use"):
        add(sched, "a", 3)
    step(sched)
    assert sched.reserve("r", 4) is not None
    with pytest.raises(ValueError, match="already in use"):
        sched.reserve("r", 4)


def test_reserve_waits_for_preempted_sequences_and_respects_max_num_seqs():
    sched = make_scheduler(num_blocks=64, max_num_seqs=2)
    add(sched, "a", 3)
    assert sched.reserve("early", 4) is None  # "a" waits to run (a preempted sequence would too)
    step(sched)
    assert sched.reserve("r1", 4) is not None
    assert sched.reserve("r2", 4) is None  # "a" running + "r1" reserved = max_num_seqs


def test_without_chunking_a_new_prompt_leaves_room_for_running_decodes():
    sched = make_scheduler(num_blocks=6, budget=64, enable_chunked_prefill=False)
    add(sched, "a", 4)
    add(sched, "b", 4, first=50)
    step(sched)  # a and b hold one full block each: their next tokens each need a new one
    add(sched, "c", 12, first=100)  # 3 blocks + the 2 the decodes need = 5 of the 4 free: c waits
    assert step(sched) == {"a": 1, "b": 1}
    assert sched.stats.preemptions == 0


def test_a_reservation_must_fit_the_prompt_it_is_filled_with():
    sched = make_scheduler()
    sched.reserve("r", 4)
    with pytest.raises(ValueError, match="1 blocks reserved for 9 prompt tokens"):
        sched.add_prefilled(Sequence("r", list(range(9)), PARAMS), first_token=5)
    assert sched.allocator.num_free == 64


def test_the_autoscaler_counters_count_prompt_tokens_computed_and_refused_reservations():
    sched = make_scheduler(budget=16, max_num_seqs=2)
    add(sched, "long", 20)  # chunked: 16 + 4 prompt tokens, then decodes that count for nothing
    for _ in range(4):
        step(sched)
    assert sched.stats.prompt_tokens == 20 and sched.stats.refused_reservations == 0
    assert sched.reserve("r1", 8) is not None
    assert sched.reserve("r2", 8) is None  # max_num_seqs: the running one and r1
    assert sched.stats.refused_reservations == 1

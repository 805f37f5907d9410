"""The mock engine (engine/mock_runner.py) inside the real LLMEngine: repeatable tokens and step
times, the usual stop rules plus the output-length hint, continuation, real KV bytes in the
profiled layout, layer hooks spread over the step, start-up time, configuration refusals."""

import dataclasses
import statistics
import time

import numpy as np
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.cost_model import CostProfile, Grid, KVSpec, Link
from engine.llm_engine import LLMEngine
from engine.mock_runner import kv_values, pseudo_token
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

# Steps of 20-60 ms: long against timer noise, short enough for a quick test.
PROFILE = CostProfile(
    name="test", source="derived", model="test-model", hardware="none", kv=KVSpec(6, 2, 16, "bfloat16"),
    prefill=Grid((16, 256), (0, 512), ((0.020, 0.030), (0.040, 0.060))),
    decode=Grid((1, 16), (16, 512), ((0.020, 0.025), (0.030, 0.040))),
    step_overhead_seconds=0.015, startup_seconds=0.0, transfer={"grpc": Link(0.001, 1e9), "nccl": Link(0.001, 1e9)},
)  # fmt: skip


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "test.json"
    PROFILE.save(path)
    return str(path)


def mock_llm(model, profile_file, **options):
    options.setdefault("kv_cache_gb", 0.01)
    return LLM(model, engine=f"mock:{profile_file}", **options)


def prompts(n, lo=3, hi=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, rng.integers(lo, hi)).tolist() for _ in range(n)]


def timed_run(llm, batch, params):
    """Tokens, and every step's (predicted, measured) seconds."""
    engine, steps = llm.engine, []
    predict = engine.runner.step_seconds
    engine.runner.step_seconds = lambda seqs: steps.append([predict(seqs)]) or steps[-1][0]
    ids = [engine.add_request(None, p, params) for p in batch]
    finished = {}
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outputs = engine.step()
        if steps and len(steps[-1]) == 1:
            steps[-1].append(time.perf_counter() - start)
        finished.update((o.request_id, o.token_ids) for o in outputs if o.finished)
    engine.runner.step_seconds = predict
    return [finished[i] for i in ids], steps


def test_same_requests_same_tokens_and_step_times(tiny_model, profile_file):
    batch, params = prompts(6), SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, seed=None)
    tokens_a, steps_a = timed_run(mock_llm(tiny_model, profile_file), batch, params)
    tokens_b, steps_b = timed_run(mock_llm(tiny_model, profile_file), batch, params)
    assert tokens_a == tokens_b and all(len(t) == 12 for t in tokens_a)
    assert [p for p, _ in steps_a] == [p for p, _ in steps_b]  # the same batches, so the same predictions
    for predicted, measured in steps_a + steps_b:
        assert measured >= predicted  # a step never ends before its predicted time...
    # ...and ends then, within timer noise (generous: this machine is shared and often loaded).
    ratio = statistics.median(m / p for p, m in steps_a + steps_b)
    print(f"\nmock steps: measured / predicted = {ratio:.3f} (median of {len(steps_a) + len(steps_b)})")
    assert ratio < 1.5


def test_tokens_depend_only_on_the_tokens_before(tiny_model, profile_file):
    llm = mock_llm(tiny_model, profile_file)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    (first,) = llm.generate([prompts(1)[0]], params)
    for k in (1, 4, 9):
        (rest,) = llm.generate([first.prompt_token_ids + first.token_ids[:k]], params)
        assert rest.token_ids[: 10 - k] == first.token_ids[k:]  # a migrated request goes on with the same tokens
    assert first.token_ids[0] == pseudo_token(first.prompt_token_ids, len(first.prompt_token_ids), 512, frozenset({2}))


def test_stop_rules_and_the_output_length_hint(tiny_model, profile_file):
    llm = mock_llm(tiny_model, profile_file)
    prompt, eos = prompts(1, seed=5)[0], 2
    free = llm.generate(prompt, SamplingParams(max_tokens=20))[0]
    assert len(free.token_ids) == 20 and free.finish_reason == "length" and eos not in free.token_ids
    hinted = llm.generate(prompt, SamplingParams(max_tokens=20, mock_output_len=5))[0]
    assert hinted.token_ids == free.token_ids[:4] + [eos] and hinted.finish_reason == "stop"
    capped = llm.generate(prompt, SamplingParams(max_tokens=3, mock_output_len=5))[0]
    assert capped.token_ids == free.token_ids[:3] and capped.finish_reason == "length"
    ignored = llm.generate(prompt, SamplingParams(max_tokens=8, mock_output_len=5, ignore_eos=True))[0]
    assert ignored.token_ids[:5] == hinted.token_ids and len(ignored.token_ids) == 8 and ignored.finish_reason == "length"
    stop_id = free.token_ids[6]
    stopped = llm.generate(prompt, SamplingParams(max_tokens=20, stop_token_ids=[stop_id]))[0]
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1] and stopped.finish_reason == "stop"
    assert llm.generate(prompt, SamplingParams(max_tokens=20, mock_output_len=1))[0].token_ids == [eos]
    with pytest.raises(ValueError, match="mock_output_len must be an integer >= 1"):
        SamplingParams(mock_output_len=0)


def test_tokens_stay_in_the_tokenizer_vocabulary_away_from_special_ids(default_model_dir, profile_file):
    llm = mock_llm(None, profile_file, kv_cache_gb=0.05)
    out = llm.generate(llm.tokenizer.encode("Once upon a time"), SamplingParams(max_tokens=300, ignore_eos=True))[0]
    assert len(out.token_ids) == 300 and all(17 <= t < 49152 for t in out.token_ids)  # SmolLM2's ids 0-16 are special
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_kv_pool_has_the_profiled_layout_and_no_weights(tiny_model, profile_file):
    engine = mock_llm(tiny_model, profile_file).engine
    assert engine.model is None
    kv = engine.kv_cache.kv
    assert kv.shape[0] == 6 and kv.shape[3:] == (16, 2, 16) and kv.dtype == torch.bfloat16 and kv.device.type == "cpu"
    narrow = mock_llm(tiny_model, profile_file, mock_kv_fraction=0.25).engine.kv_cache.kv
    assert narrow.shape[0] == 6 and narrow.shape[3:] == (16, 1, 8)  # one head of 2 x 16 x 0.25 values


def test_pool_defaults_to_the_profiled_capacity(tiny_model, tmp_path):
    """Without a pool size of its own, a mock engine holds the profiled machine's KV capacity."""
    dataclasses.replace(PROFILE, kv_capacity_tokens=1600).save(tmp_path / "cap.json")
    engine = LLMEngine(EngineConfig(tiny_model, engine=f"mock:{tmp_path / 'cap.json'}"))
    assert engine.kv_stats().total == 100  # 1,600 tokens in blocks of 16
    assert LLMEngine(EngineConfig(tiny_model, engine=f"mock:{tmp_path / 'cap.json'}", num_kv_blocks=64)).kv_stats().total == 64


def test_computed_slots_hold_deterministic_kv(tiny_model, profile_file):
    engine = mock_llm(tiny_model, profile_file).engine
    prompt = prompts(1, lo=30, hi=31)[0]
    engine.add_request("r", prompt, SamplingParams(max_tokens=1), prefill_only=True)
    (out,) = engine.step()
    assert out.finish_reason == "prefilled"
    kv, bs = engine.kv_cache.kv, engine.config.block_size
    positions = np.arange(len(prompt))
    got = torch.stack([kv[:, :, out.block_ids[p // bs], p % bs] for p in positions], dim=2)  # [L, 2, T, H, D]
    want = kv_values(np.array(prompt), positions, kv.shape[0]).to(kv.dtype)[..., None, None].expand_as(got)
    assert torch.equal(got, want)
    engine.release("r")


def test_layer_hooks_are_spread_over_the_step(tiny_model, profile_file):
    engine = mock_llm(tiny_model, profile_file).engine
    engine.add_request("r", prompts(1, lo=200, hi=201)[0], SamplingParams(max_tokens=1), prefill_only=True)
    calls = []
    start = time.perf_counter()
    engine.step(lambda layer, completing: calls.append((layer, time.perf_counter(), completing)))
    seconds = PROFILE.prefill_seconds(200, 0)
    assert [layer for layer, _, _ in calls] == list(range(6)) and all(c[0][0] == "r" for _, _, c in calls)
    for layer, at, _ in calls:
        assert at - start >= seconds * (layer + 1) / 6  # layer i's KV is "computed" i+1 sixths into the step
    engine.release("r")


def test_mixed_steps_are_timed_as_one(tiny_model, profile_file):
    runner = mock_llm(tiny_model, profile_file).engine.runner
    seqs = []
    for n, computed, scheduled in ((40, 39, 1), (60, 59, 1), (300, 100, 200)):
        seq = Sequence(f"s{n}", list(range(n)), SamplingParams())
        seq.num_computed_tokens, seq.num_scheduled_tokens = computed, scheduled
        seqs.append(seq)
    assert runner.step_seconds(seqs) == PROFILE.step_seconds([(200, 100)], 2, 40 + 60)


def test_startup_lasts_the_profiled_time(tiny_model, tmp_path):
    dataclasses.replace(PROFILE, startup_seconds=1.0).save(tmp_path / "slow.json")
    start = time.perf_counter()
    LLMEngine(EngineConfig(tiny_model, engine=f"mock:{tmp_path / 'slow.json'}", kv_cache_gb=0.01))
    assert time.perf_counter() - start >= 1.0


def test_scheduled_batch_records_the_step_start():
    before = time.perf_counter()
    assert before <= ScheduledBatch().started <= time.perf_counter()


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(engine="fake"), ValueError, "engine must be 'real', 'mock' or 'mock:PROFILE'"),
        (dict(engine="mock:/no/such/profile.json"), FileNotFoundError, "no cost profile"),
        (dict(engine="mock", mock_kv_fraction=0), ValueError, "mock_kv_fraction must be in"),
    ],
)
def test_bad_engine_choices_are_refused(tiny_model, options, error, message):
    with pytest.raises(error, match=message):
        LLMEngine(EngineConfig(tiny_model, **options))

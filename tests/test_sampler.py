"""Sampling: seeded reproducibility, and top-k / top-p / temperature respected (statistical
checks with a fixed seed)."""

import math
from collections import Counter

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import Sampler, seed_for

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()
N = 4000


def draw(params, n=N, logits=LOGITS, seed=0):
    sampler = Sampler(seed, torch.device("cpu"))
    rows = logits.repeat(n, 1)
    return Counter(sampler(rows, [params] * n, [0] * n).token_ids)


def freq(counts, token):
    return counts[token] / sum(counts.values())


def within(observed, expected, n=N):
    return abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9


def test_plain_sampling_follows_the_distribution():
    counts = draw(SamplingParams(temperature=1.0))
    for token, p in enumerate(PROBS.tolist()):
        assert within(freq(counts, token), p), (token, freq(counts, token), p)


@pytest.mark.parametrize("temperature", [1e-50, 1e-40, 1e-6, 1e-3])
def test_a_tiny_temperature_takes_the_likeliest_token(temperature):
    """Below float32's range the division gave inf logits, a NaN draw and token 0: the likeliest
    token is the last here, so that would fail. Under 1e-5 it is greedy (as vLLM); above, sharp."""
    assert draw(SamplingParams(temperature=temperature), n=64, logits=LOGITS.flip(0)) == Counter({3: 64})


def test_top_k_keeps_only_the_k_most_likely():
    counts = draw(SamplingParams(temperature=1.0, top_k=2))
    assert set(counts) == {0, 1}
    assert within(freq(counts, 0), 0.5 / 0.8)


def test_top_p_keeps_the_smallest_set_reaching_p():
    counts = draw(SamplingParams(temperature=1.0, top_p=0.75))  # 0.5 + 0.3 is the smallest set >= 0.75
    assert set(counts) == {0, 1}
    assert within(freq(counts, 1), 0.3 / 0.8)
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.4))) == {0}  # the top token alone


def test_top_k_past_the_vocabulary_keeps_it_all_beside_a_smaller_one():
    sampler = Sampler(0, torch.device("cpu"))
    params = [SamplingParams(temperature=1.0, top_k=1000), SamplingParams(temperature=1.0, top_k=1)] * (N // 2)
    tokens = sampler(LOGITS.repeat(N, 1), params, [0] * N).token_ids
    assert Counter(tokens[1::2]) == Counter({0: N // 2})
    assert within(freq(Counter(tokens[0::2]), 3), PROBS[3].item(), N // 2)


def test_top_k_then_top_p_together():
    counts = draw(SamplingParams(temperature=1.0, top_k=3, top_p=0.9))  # k=3 -> renormalized 0.53/0.32/0.16
    assert set(counts) == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    sharp = draw(SamplingParams(temperature=0.25))
    flat = draw(SamplingParams(temperature=4.0))
    p_sharp = (PROBS**4 / (PROBS**4).sum())[0].item()
    p_flat = (PROBS**0.25 / (PROBS**0.25).sum())[0].item()
    assert within(freq(sharp, 0), p_sharp) and within(freq(flat, 0), p_flat)


def test_greedy_is_argmax_whatever_the_other_options():
    assert draw(SamplingParams(temperature=0, top_p=0.5), n=10) == Counter({0: 10})
    assert draw(SamplingParams(temperature=1.5, top_k=1), n=10) == Counter({0: 10})


def test_seeded_rows_do_not_depend_on_batch_or_engine_seed():
    logits = torch.randn(1, 1000)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [Sampler(0, torch.device("cpu"))(logits, [p], [i]).token_ids[0] for i in range(20)]
    other_engine = Sampler(99, torch.device("cpu"))
    in_batch = [other_engine(torch.cat([torch.randn(3, 1000), logits]), [SamplingParams()] * 3 + [p], [0, 0, 0, i]).token_ids[3]
                for i in range(20)]  # fmt: skip
    assert alone == in_batch
    assert len(set(alone)) > 1  # the stream varies with the token index


def test_seed_mixing_spreads_nearby_seeds():
    assert len({seed_for(s, i) for s in range(50) for i in range(50)}) == 2500
    assert all(0 <= seed_for(s, 0) < 2**63 for s in (0, 1, 2**62, -5))


def test_seeded_generation_is_reproducible_end_to_end(tiny_model):
    llm = LLM(tiny_model, kv_cache_gb=0.01)
    prompt = list(range(10, 40))
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7, max_tokens=24, ignore_eos=True)
    first = llm.generate(prompt, params)[0].token_ids
    again = llm.generate([prompt, list(range(50, 90))], [params, SamplingParams(temperature=1.0, max_tokens=30)])[0]
    assert again.token_ids == first
    other_seed = llm.generate(prompt, SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=8, max_tokens=24, ignore_eos=True))
    assert other_seed[0].token_ids != first


def test_logprobs_are_the_raw_log_softmax_and_only_for_rows_that_ask():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_k=3, logprobs=0)]
    out = Sampler(0, torch.device("cpu"))(logits, params, [0, 0, 0])
    expected = logits.log_softmax(-1)  # temperature and top-k do not change what is reported
    first, third = out.logprobs[0], out.logprobs[2]
    assert out.logprobs[1] is None
    assert first.logprob == pytest.approx(expected[0, out.token_ids[0]].item(), abs=1e-6)
    values, ids = expected[0].topk(5)
    assert [t for t, _ in first.top] == ids.tolist() and [v for _, v in first.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert third.top == () and third.logprob == pytest.approx(expected[2, out.token_ids[2]].item(), abs=1e-6)
    # Ranks: the greedy token is the most likely; a temperature-2 sample from the top 3, one of the first three.
    assert first.rank == 1 and 1 <= third.rank <= 3 and third.rank == int((expected[2] >= expected[2, out.token_ids[2]]).sum())


def test_min_tokens_keeps_eos_and_stop_ids_out_until_reached():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]]).repeat(3, 1)  # token 2 (EOS) is the argmax, then 3
    sampler = Sampler(0, torch.device("cpu"), eos_token_ids=(2,))
    short = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3], max_tokens=8, logprobs=0)
    out = sampler(logits, [short, short, SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)], [1, 2, 0])
    # Before min_tokens: neither EOS nor stop id 3; after: EOS again; with ignore_eos, as vLLM's, still no EOS before min_tokens.
    assert out.token_ids == [4, 2, 3]
    assert out.logprobs[0].logprob == pytest.approx(logits[0].log_softmax(-1)[4].item())  # the raw distribution's


def sampler_logits(logits, params, output_index, history):
    from engine.sampler import _penalize

    out = logits.clone()
    _penalize(out, [params], [output_index], history)
    return out


def test_penalties_by_hand():
    """Prompt [0, 1], output [2, 2, 3]: repetition 2 over all four seen tokens (a positive logit
    halved, a negative one doubled), then frequency 0.5 x count and presence 1 over the output's."""
    logits = torch.tensor([[4.0, -1.0, 3.0, 2.0, 0.5]])
    history = [[0, 1, 2, 2, 3]]
    out = lambda **kw: sampler_logits(logits, SamplingParams(temperature=0, **kw), 3, history)  # noqa: E731
    assert out(repetition_penalty=2.0).tolist() == [[2.0, -2.0, 1.5, 1.0, 0.5]]
    assert out(frequency_penalty=0.5).tolist() == [[4.0, -1.0, 2.0, 1.5, 0.5]]
    assert out(presence_penalty=1.0, frequency_penalty=0.5).tolist() == [[4.0, -1.0, 1.0, 0.5, 0.5]]
    assert out(repetition_penalty=2.0, presence_penalty=-1.0).tolist() == [[2.0, -2.0, 2.5, 2.0, 0.5]]
    # The output is the last output_index tokens, wherever they were produced (a moved request's
    # earlier ones end its prompt): none yet, and the output penalties have nothing to count.
    assert sampler_logits(logits, SamplingParams(temperature=0, frequency_penalty=2.0), 0, history).tolist() == logits.tolist()


def test_penalties_kept_across_steps_equal_penalties_counted_afresh():
    """A request's Penalties, taking in each step's new token, give every step what a count over
    the whole history gives: the prompt counts for repetition only, the output for all three."""
    from engine.sampler import Penalties, _penalize

    rng = torch.Generator().manual_seed(3)
    params = SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.7)
    history, kept = [5, 9, 9, 2], Penalties(torch.device("cpu"))
    for step in range(6):
        logits = torch.randn(1, 12, generator=rng)
        incremental, afresh = logits.clone(), logits.clone()
        _penalize(incremental, [params], [step], [history], [kept])
        _penalize(afresh, [params], [step], [history])
        assert torch.equal(incremental, afresh)
        history = history + [int(torch.randint(0, 12, (1,), generator=rng))]
    assert kept.out_counts.sum() == 5 and sorted(kept.seen_ids.tolist()) == sorted(set(history[:-1]))


def test_penalties_steer_greedy_and_leave_other_rows_alone():
    logits = torch.tensor([[5.0, 4.0, 0.0]]).repeat(2, 1)
    penalized = SamplingParams(temperature=0, frequency_penalty=1.0)
    out = Sampler(0, torch.device("cpu"))(logits, [penalized, SamplingParams(temperature=0)], [2, 2], [[0, 0], [0, 0]])
    assert out.token_ids == [1, 0]  # 5 - 2 x 1 = 3 < 4 for the penalized row only


def test_logit_bias_is_added_before_the_choice_and_not_to_the_raw_logprobs():
    logits = torch.tensor([[5.0, 4.0, 0.0]]).repeat(2, 1)
    biased = SamplingParams(temperature=0, logit_bias={2: 6.0, 0: -1.5}, logprobs=0)
    out = Sampler(0, torch.device("cpu"))(logits, [biased, SamplingParams(temperature=0)], [0, 0])
    assert out.token_ids == [2, 0] and biased.logit_bias == ((2, 6.0), (0, -1.5))
    assert out.logprobs[0].logprob == pytest.approx(logits[0].log_softmax(-1)[2].item())


def test_allowed_token_ids_leave_only_those_to_choose_and_the_raw_logprobs_as_they_are():
    allowed = SamplingParams(temperature=0, allowed_token_ids=[3, 2], logprobs=0)
    out = Sampler(0, torch.device("cpu"))(LOGITS.repeat(2, 1), [allowed, SamplingParams(temperature=0)], [0, 0])
    assert out.token_ids == [2, 0] and allowed.allowed_token_ids == (3, 2)
    assert out.logprobs[0].logprob == pytest.approx(LOGITS.log_softmax(-1)[2].item())
    counts = draw(SamplingParams(allowed_token_ids=[1, 3]))
    assert set(counts) == {1, 3} and within(freq(counts, 1), 0.3 / 0.35)


def test_a_bad_word_loses_its_last_token_where_the_output_ends_with_the_rest():
    """Words [2] and [1, 3]: token 2 never; token 3 only right after a 1 in the output (the prompt's
    tokens do not count)."""
    params = SamplingParams(temperature=0, bad_words_token_ids=[[2], [1, 3]])
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0]]).repeat(3, 1)
    out = Sampler(0, torch.device("cpu"))(logits, [params] * 3, [1, 1, 0], [[7, 1], [7, 0], [1]])
    assert out.token_ids == [1, 3, 3]  # banned 2 everywhere; 3 after the output's 1; the prompt's 1 is not output


def test_min_p_drops_the_tokens_below_its_share_of_the_top():
    counts = draw(SamplingParams(min_p=0.5))  # tokens below 0.5 x 0.5: 2 (0.15) and 3 (0.05)
    assert set(counts) == {0, 1} and within(freq(counts, 0), 0.5 / 0.8)
    assert set(draw(SamplingParams(min_p=0.0))) == {0, 1, 2, 3}


@pytest.mark.parametrize("bad", [dict(seed="x"), dict(stop=[""]), dict(stop_token_ids=[-1]), dict(max_tokens=1.5), dict(temperature=float("nan")),
                                 dict(logprobs=21), dict(logprobs=-1), dict(min_tokens=17), dict(min_tokens=-1), dict(min_p=1.5),
                                 dict(presence_penalty=-2.1), dict(frequency_penalty=3), dict(repetition_penalty=0),
                                 dict(repetition_penalty=float("inf")), dict(logit_bias={1: float("nan")}), dict(logit_bias={-1: 1.0}),
                                 dict(logit_bias={"a": 1.0}), dict(allowed_token_ids=[]), dict(allowed_token_ids=[-1]),
                                 dict(bad_words=[" "]), dict(bad_words_token_ids=[[]])])  # fmt: skip
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_logit_bias_is_clamped_to_openais_range_as_vllm_does():
    assert SamplingParams(logit_bias={1: -1e9, 2: 101, 3: 5}).logit_bias == ((1, -100.0), (2, 100.0), (3, 5))

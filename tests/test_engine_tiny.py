"""The engine on tiny random-weight models: every architecture against transformers, both
attention backends, and the scheduler paths (chunking, prefix caching, preemption)."""

import random
from collections import Counter

import pytest
import torch
from oracle import ORACLE_DTYPE, assert_matches_oracle, assert_rank_matches, hf_greedy

from engine import LLM, SamplingParams
from engine.model import PackedLinear
from engine.padding import padded_rows
from engine.sequence import FinishReason

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(n, seed=0, lo=3, hi=60, vocab=512):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def make_llm(model, **options):
    options.setdefault("kv_cache_gb", 0.01)
    options.setdefault("dtype", ORACLE_DTYPE)
    return LLM(model, **options)


@pytest.fixture(scope="module")
def hf_models(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    return {a: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for a, d in tiny_model_dirs.items()}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("arch", ["llama", "llama-untied", "qwen2", "mistral"])
def test_greedy_matches_transformers(arch, backend, tiny_model_dirs, hf_models):
    """The default backend (on CPU the C decode kernel, "cpu"; on CUDA Triton) and the torch one
    (the CPU's fallback without a C compiler)."""
    llm = make_llm(tiny_model_dirs[arch], attention_backend=backend)
    batch = prompts(6, seed=1)
    outs = llm.generate(batch, GREEDY)
    for p, out in zip(batch, outs):
        assert assert_matches_oracle(hf_models[arch], p, out.token_ids, hf_greedy(hf_models[arch], p, 12))
    llm.engine.check_invariants()
    assert llm.engine.kv_stats().in_use == 0


PENALTIES = [dict(repetition_penalty=1.3), dict(presence_penalty=1.5, frequency_penalty=0.5), dict(repetition_penalty=0.8, frequency_penalty=-0.7)]


class _OutputPenalties:
    """OpenAI's presence and frequency penalties as a transformers logits processor (transformers
    has none built in): over the tokens generated so far, not the prompt's."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for row, ids in zip(scores, input_ids[:, self.prompt_len :]):
            for token, count in Counter(ids.tolist()).items():
                row[token] -= self.frequency * count + self.presence
        return scores


@pytest.mark.parametrize("penalties", PENALTIES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_penalties_match_transformers(penalties, tiny_model, hf_models):
    """Greedy with penalties: the tokens of transformers' generate with its repetition_penalty and
    the presence/frequency processor above. Penalties make a short random-weight model repeat
    less, so the outputs differ from plain greedy (checked)."""
    from transformers import LogitsProcessorList

    hf = hf_models["llama"]
    batch = prompts(4, seed=11)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **penalties)
    outs = make_llm(tiny_model).generate(batch, params)
    for p, out in zip(batch, outs):
        ids = torch.tensor([p])
        extra = {"repetition_penalty": penalties["repetition_penalty"]} if "repetition_penalty" in penalties else {}
        output = _OutputPenalties(len(p), penalties.get("presence_penalty", 0.0), penalties.get("frequency_penalty", 0.0))
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                   pad_token_id=0, logits_processor=LogitsProcessorList([output]), **extra)[0, len(p) :].tolist()  # fmt: skip
        assert out.token_ids == expected
    plain = make_llm(tiny_model).generate(batch, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in plain] != [o.token_ids for o in outs]


def test_logit_bias_steers_greedy_generation(tiny_model):
    """+100 on a token makes it every greedy choice; -100 on plain greedy's first token makes the
    runner-up come first (and the engine's second row, unbiased, is untouched)."""
    (p,) = prompts(1, seed=4)
    llm = make_llm(tiny_model)
    plain = llm.generate(p, GREEDY)[0].token_ids
    forced, avoided, unbiased = llm.generate([p, p, p], [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={7: 100}),
                                                       SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={plain[0]: -100}),
                                                       GREEDY])  # fmt: skip
    assert forced.token_ids == [7] * 12 and unbiased.token_ids == plain
    assert avoided.token_ids[0] != plain[0] and avoided.token_ids[0] == llm.generate(p, SamplingParams(temperature=0, max_tokens=1, logprobs=2))[0].logprobs[0].top[1][0]


def test_allowed_token_ids_match_transformers_prefix_allowed_tokens(tiny_model, hf_models):
    """Greedy among allowed_token_ids: transformers' generate with prefix_allowed_tokens_fn
    giving the same ids at every step."""
    batch = prompts(3, seed=5)
    allowed = [3, 17, 40, 41, 99, 250]
    outs = make_llm(tiny_model).generate(batch, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed))
    for p, out in zip(batch, outs):
        ids = torch.tensor([p])
        with torch.no_grad():
            expected = hf_models["llama"].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                                   eos_token_id=None, pad_token_id=0,
                                                   prefix_allowed_tokens_fn=lambda batch_id, sent: allowed)[0, len(p) :].tolist()  # fmt: skip
        assert out.token_ids == expected and set(out.token_ids) <= set(allowed)
    assert len({t for o in outs for t in o.token_ids}) > 1


@pytest.mark.parametrize("options", [{}, dict(chunk_size=7), dict(enable_chunked_prefill=False), dict(max_model_len=80, num_kv_blocks=8)],
                         ids=["default", "chunk-7", "no-chunking", "preempted"])  # fmt: skip
def test_prompt_logprobs_match_transformers(options, tiny_model, hf_models):
    """Each prompt token's logprob given the tokens before it, and its top 3: transformers'
    log-softmax of its logits over the prompt. Whole or in chunks; a prompt whose prefix is
    cached (computed again: its rows are needed); preempted (recomputed, reported once)."""
    batch = prompts(4, seed=12, lo=20, hi=40)
    batch.append(batch[0] + [5, 6, 7])  # its first block is in the prefix cache
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=3)
    llm = make_llm(tiny_model, **options)
    llm.generate(batch[0], plain)
    outs = llm.generate(batch, params)
    for p, out in zip(batch, outs):
        with torch.no_grad():
            expected = hf_models["llama"](torch.tensor([p])).logits[0].float().log_softmax(-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        for i, lp in enumerate(out.prompt_logprobs[1:]):
            assert lp.logprob == pytest.approx(expected[i, p[i + 1]].item(), abs=1e-4)
            assert [t for t, _ in lp.top] == expected[i].topk(3).indices.tolist()
            assert_rank_matches(expected[i], p[i + 1], lp.rank)
    assert [o.token_ids for o in outs] == [o.token_ids for o in make_llm(tiny_model).generate(batch, plain)]
    assert outs[-1].num_cached_tokens == 0 and llm.engine.scheduler.stats.prefix_hit_tokens == 0
    assert ("num_kv_blocks" in options) == (llm.engine.scheduler.stats.preemptions > 0)
    assert llm.engine.kv_stats().in_use == 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN: linears stay plain")
def test_a_float32_cpu_model_runs_its_projections_on_packed_weights(tiny_model_dirs, hf_models):
    """Every projection, and the LM head (a packed copy of the tied embedding), is a PackedLinear,
    within float32 rounding of the checkpoint's plain weights, at a row count it runs as is and at
    one it pads."""
    model = make_llm(tiny_model_dirs["llama"], device="cpu", dtype="float32").engine.model
    hf = hf_models["llama"]
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 4 * len(model.layers) + 1
    assert model.num_parameters == sum(p.numel() for p in hf.parameters())
    mlp = hf.model.layers[1].mlp
    close = dict(rtol=1e-5, atol=1e-5)
    for rows in (5, 21):
        x = torch.randn(rows, hf.config.hidden_size)
        gate_up = model.layers[1].mlp.gate_up_proj(x)
        torch.testing.assert_close(gate_up, torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1), **close)
        torch.testing.assert_close(model.compute_logits(x), hf.lm_head(x), **close)
        residual = torch.randn(rows, hf.config.hidden_size)  # the add fused into the matmul: exactly residual + y
        o_proj = model.layers[1].self_attn.o_proj
        assert torch.equal(o_proj(x, add=residual), residual + o_proj(x))


def test_packed_linears_meet_few_row_counts():
    """Every row count a 2,048-token step can have maps to one of 72 padded counts (oneDNN keeps
    memory per count it has seen), never fewer rows, nor more than 1/8 extra; small decode
    batches run unpadded."""
    padded = {rows: padded_rows(rows) for rows in range(1, 2049)}
    assert len(set(padded.values())) == 72
    assert all(rows <= p <= rows * 9 / 8 for rows, p in padded.items())
    assert all(padded[rows] == rows for rows in range(1, 17))


def test_triton_backend_matches_torch_backend(tiny_model):
    """The Triton kernels inside the full model (under the interpreter on CPU): a batch that mixes
    prompt chunks with decodes, long prompts chunked across steps, shared prefixes."""
    batch = prompts(5, seed=2, hi=40)
    batch.append(batch[0] + [7, 8, 9])  # shares a cached prefix with the first
    options = dict(max_num_batched_tokens=32, max_num_seqs=8)
    torch_out = make_llm(tiny_model, attention_backend="torch", **options).generate(batch, GREEDY)
    triton_llm = make_llm(tiny_model, attention_backend="triton", **options)
    triton_out = triton_llm.generate(batch, GREEDY)
    assert [o.token_ids for o in triton_out] == [o.token_ids for o in torch_out]
    assert triton_llm.engine.scheduler.stats.chunked_prefill_steps > 0
    assert triton_llm.engine.kv_stats().in_use == 0


def test_batch_invariance(tiny_model):
    llm = make_llm(tiny_model)
    batch = prompts(16, seed=3)
    alone = llm.generate(batch[5], GREEDY)[0].token_ids
    together = llm.generate(batch, GREEDY)
    assert together[5].token_ids == alone


@pytest.mark.parametrize(
    "options",
    [
        dict(enable_prefix_caching=False),
        dict(enable_chunked_prefill=False),
        dict(max_num_batched_tokens=16, max_num_seqs=4),
        dict(chunk_size=7),
        dict(block_size=4),
    ],
    ids=["no-prefix-cache", "no-chunking", "small-budget", "chunk-7", "block-4"],
)
def test_scheduling_options_never_change_greedy_output(tiny_model, options):
    batch = prompts(8, seed=4)
    batch += [batch[0][:20] + p for p in prompts(3, seed=5, lo=2, hi=9)]  # shared prefixes
    baseline = make_llm(tiny_model).generate(batch, GREEDY)
    llm = make_llm(tiny_model, **options)
    assert [o.token_ids for o in llm.generate(batch, GREEDY)] == [o.token_ids for o in baseline]
    llm.engine.check_invariants()
    assert llm.engine.kv_stats().in_use == 0


def test_preemption_recomputes_and_keeps_output(tiny_model):
    """A pool far too small for the batch: sequences are preempted and recomputed, every one
    finishes with the tokens it gets when memory is plentiful, and no block leaks."""
    batch = prompts(10, seed=6, lo=20, hi=40)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = make_llm(tiny_model).generate(batch, params)
    # One sequence of max_model_len 80 needs 5 blocks of 16: 8 blocks hold one or two at a time.
    small = make_llm(tiny_model, max_model_len=80, num_kv_blocks=8)
    outs = small.generate(batch, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert small.engine.scheduler.stats.preemptions > 0
    small.engine.check_invariants()
    assert small.engine.kv_stats().in_use == 0


def test_abort_frees_blocks_at_every_stage(tiny_model):
    llm = make_llm(tiny_model, max_num_batched_tokens=16, max_num_seqs=4)
    engine = llm.engine
    ids = [engine.add_request(None, p, GREEDY) for p in prompts(6, seed=7, lo=20, hi=30)]
    engine.step()  # some prefilling (chunked), some waiting
    engine.step()
    engine.abort(ids[0])
    engine.abort(ids[5])  # still waiting
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.new_token_ids and out.request_id == ids[1]:
                engine.abort(ids[1])  # mid-decode
    engine.check_invariants()
    assert engine.kv_stats().in_use == 0


def test_finish_reasons_and_stop_token_ids(tiny_model):
    llm = make_llm(tiny_model)
    p = prompts(1, seed=8)[0]
    free_run = llm.generate(p, GREEDY)[0]
    stop_at = free_run.token_ids[4]
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert out.finish_reason == FinishReason.STOP.value
    assert out.token_ids == free_run.token_ids[: free_run.token_ids.index(stop_at) + 1]
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 12


def test_generation_stops_at_max_model_len(tiny_model):
    llm = make_llm(tiny_model, max_model_len=40)
    out = llm.generate(list(range(3, 33)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_prefill_and_decode_roles_reproduce_one_engine(tiny_model):
    """Prefill on one engine, copy the KV blocks, continue on another: the same tokens as one
    engine, sampled (seeded) or greedy. This is the disaggregated path without the transport."""
    batch = prompts(3, seed=9)
    params = [GREEDY, SamplingParams(temperature=0.8, top_p=0.9, seed=42, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5)]  # fmt: skip
    prefill, decode = make_llm(tiny_model).engine, make_llm(tiny_model).engine
    for i, p in enumerate(batch[:2]):
        for j, sp in enumerate(params):
            expected = make_llm(tiny_model).generate(p, sp)[0].token_ids
            rid = f"r{i}{j}"
            prefill.add_request(rid, p, sp, prefill_only=True)
            (out,) = [o for o in prefill.step() if o.request_id == rid]
            assert out.finish_reason == "prefilled" and len(out.block_ids) == -(-len(p) // 16)
            dst = decode.reserve(rid, len(p))
            decode.kv_cache.kv[:, :, dst] = prefill.kv_cache.kv[:, :, out.block_ids]
            prefill.release(rid)
            decode.add_prefilled(rid, p, out.token_ids[0], sp)
            (first,) = decode.take_outputs()  # the first token, reported before any decode step
            tokens = list(first.new_token_ids)
            assert tokens == [out.token_ids[0]] and not decode.take_outputs()
            while decode.has_unfinished_requests():
                tokens += [t for o in decode.step() if o.request_id == rid for t in o.new_token_ids]
            assert tokens == expected
    for engine in (prefill, decode):
        engine.check_invariants()
        assert engine.kv_stats().in_use == 0
    assert decode.reserve("too-big", 10**6) is None


def test_a_request_resumed_with_an_output_offset_continues_as_one_run(tiny_model):
    """A request moved after k tokens comes back with them at the end of its prompt and
    output_offset=k: seeded or greedy, on one engine or split into the prefill and decode roles,
    it produces exactly the rest of what one uninterrupted run gives, and max_tokens counts all."""
    (p,) = prompts(1, seed=3)
    penalized = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, presence_penalty=1.0, frequency_penalty=0.5)
    for sp in (GREEDY, SamplingParams(temperature=0.8, top_p=0.9, seed=42, max_tokens=12, ignore_eos=True), penalized):
        whole = make_llm(tiny_model).generate(p, sp)[0].token_ids
        for k in (1, 5, 11):
            engine = make_llm(tiny_model).engine
            engine.add_request("r", p + whole[:k], sp, output_offset=k)
            rest = []
            while engine.has_unfinished_requests():
                rest += [t for o in engine.step() for t in o.new_token_ids]
            assert rest == whole[k:]
            prefill, decode = make_llm(tiny_model).engine, make_llm(tiny_model).engine
            prefill.add_request("r", p + whole[:k], sp, prefill_only=True, output_offset=k)
            (out,) = prefill.step()
            dst = decode.reserve("r", len(p) + k)
            decode.kv_cache.kv[:, :, dst] = prefill.kv_cache.kv[:, :, out.block_ids]
            decode.add_prefilled("r", p + whole[:k], out.token_ids[0], sp, output_offset=k)
            rest = []
            while decode.has_unfinished_requests():
                rest += [t for o in decode.step() for t in o.new_token_ids]
            assert rest == whole[k:]
    with pytest.raises(ValueError, match="output_offset 12 must be below max_tokens"):
        make_llm(tiny_model).engine.add_request("bad", p + whole, GREEDY, output_offset=12)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], None, "prompt is empty"),
        ("", None, "no tokenizer"),
        (list(range(3, 600)), None, "prompt has 597 tokens; the maximum is 511"),
        ([5, 512], None, "token id 512 is outside the vocabulary"),
        ([5, -1], None, "token id -1 is outside the vocabulary"),
        # Ids the sampler indexes the logits with: one past the vocabulary would fail the whole batch's step.
        ([5, 6], SamplingParams(logit_bias={600: 1.0}), "logit_bias: token id 600 is outside the vocabulary"),
        ([5, 6], SamplingParams(allowed_token_ids=[5, 600]), "allowed_token_ids: token id 600 is outside"),
        ([5, 6], SamplingParams(bad_words_token_ids=[[5, 600]]), "bad_words_token_ids: token id 600 is outside"),
        ([5, 6], SamplingParams(allowed_token_ids=[7], stop_token_ids=[7], min_tokens=1), "nothing could be sampled"),
    ],
)
def test_bad_prompts_raise_clear_errors(tiny_model, prompt, params, message):
    llm = make_llm(tiny_model)
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], params)
    assert not llm.engine.has_unfinished_requests()


def test_max_tokens_none_generates_up_to_the_context(tiny_model):
    """Also when resumed (a moved request: the last output_offset tokens are output already)."""
    llm = make_llm(tiny_model)
    out = llm.generate([list(range(3, 503))], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 512 - 500 and out.finish_reason == "length"
    llm.engine.add_request("resumed", list(range(3, 503)) + out.token_ids[:4], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True),
                           output_offset=4)  # fmt: skip
    rest = []
    while llm.engine.has_unfinished_requests():
        rest += [t for o in llm.engine.step() for t in o.new_token_ids]
    assert rest == out.token_ids[4:]


def test_bad_batch_queues_nothing(tiny_model):
    llm = make_llm(tiny_model)
    with pytest.raises(ValueError):
        llm.generate([[5, 6], [7, 9999]], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_kv_budget_too_small_for_one_sequence(tiny_model):
    with pytest.raises(ValueError, match="KV cache too small.*max_model_len=512 needs 32 blocks"):
        LLM(tiny_model, kv_cache_gb=1e-6)


def test_a_long_prompt_never_holds_up_running_decodes(tiny_model):
    """Decode-maximal batching: while a long prompt arrives, every step still carries all 16
    decoding sequences, and the prompt takes at most one chunk per step."""
    llm = make_llm(tiny_model, chunk_size=48, max_num_batched_tokens=128, max_num_seqs=32)
    engine = llm.engine
    for p in prompts(16, seed=10, lo=5, hi=20):
        engine.add_request(None, p, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    while any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    batches = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        batches.append([(s.request_id, s.num_scheduled_tokens) for s in batch.seqs])
        return batch

    engine.scheduler.schedule = recording
    long_id = engine.add_request(None, list(range(3, 403)), SamplingParams(temperature=0, max_tokens=4))
    while any(s.request_id == long_id and s.num_uncomputed_tokens > 1 for s in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()
    assert len(batches) >= 400 // 48  # the prompt was spread over several steps
    for batch in batches:
        decodes = [n for rid, n in batch if rid != long_id]
        assert len(decodes) == 16 and all(n == 1 for n in decodes)
        assert dict(batch).get(long_id, 0) <= 48


def test_cpu_backend_is_the_float32_cpu_default_and_refuses_other_dtypes(tiny_model):
    from kernels import cpu_attention

    if cpu_attention.compiler() is None:
        pytest.skip("no C compiler: the torch backend is the default")
    llm = make_llm(tiny_model, device="cpu", dtype="float32")
    assert llm.engine.config.attention_backend == "cpu"
    assert make_llm(tiny_model, device="cpu", dtype="bfloat16").engine.config.attention_backend == "torch"
    with pytest.raises(ValueError, match="runs float32 on the CPU at a head_dim"):
        make_llm(tiny_model, device="cpu", dtype="bfloat16", attention_backend="cpu")

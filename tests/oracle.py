"""The correctness oracle: transformers' own greedy generate on the same weights.

Like is compared with like: transformers runs in float32, and so does every engine a test holds
to it (ORACLE_DTYPE), on every device: on CUDA the engine's own default is bfloat16, whose
rounding alone moves logits by more than NEAR_TIE. The engine in its CUDA dtype is held to
transformers in that same dtype, with a tolerance of its own (test_default_model).
"""

import torch

ORACLE_DTYPE = "float32"

NEAR_TIE = 1e-3


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate(do_sample=False), EOS disabled so exactly max_new_tokens come back."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


def top2_gap(hf_model, token_ids: list[int]) -> float:
    """Gap between the two largest next-token logits after token_ids."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0, -1].float()
    top = logits.topk(2).values
    return (top[0] - top[1]).item()


def assert_matches_oracle(hf_model, prompt_ids: list[int], ours: list[int], expected: list[int]) -> bool:
    """Token-identical, or diverging only where transformers itself sees a near-tie (then the
    rest cannot be compared). Returns True if identical."""
    assert len(ours) == len(expected), f"{len(ours)} tokens, oracle has {len(expected)}"
    for i, (a, b) in enumerate(zip(ours, expected)):
        if a != b:
            gap = top2_gap(hf_model, prompt_ids + expected[:i])
            assert gap < NEAR_TIE, (
                f"diverged at output token {i} ({a} vs oracle {b}) where the top-2 logit gap is {gap:.2e}, "
                f"not a near-tie (< {NEAR_TIE})"
            )
            return False
    return True


def assert_same_or_near_tie(hf_model, prompt_ids: list[int], a: list[int], b: list[int]) -> None:
    """Two runs of our engine: identical, or first differing at a near-tie (judged by transformers)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            gap = top2_gap(hf_model, prompt_ids + a[:i])
            assert gap < NEAR_TIE, f"runs differ at token {i} ({x} vs {y}); top-2 gap {gap:.2e} is no near-tie"
            return
    assert len(a) == len(b)


LOGPROB_TOLERANCE = 1e-4


def hf_logprobs(hf_model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax of the logits that chose each output token: [len(output_ids), vocab]."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids + output_ids])).logits[0].float()
    return logits[len(prompt_ids) - 1 : len(prompt_ids) + len(output_ids) - 1].log_softmax(-1)


def assert_rank_matches(row: torch.Tensor, token: int, rank: int) -> None:
    """`rank` is the token's rank in transformers' log-softmax `row` (vLLM's count: the tokens at
    least as likely), up to the tokens within LOGPROB_TOLERANCE of it, which another CPU's sums
    may order either way."""
    value = row[token].item()
    least, most = int((row >= value + LOGPROB_TOLERANCE).sum()) + 1, int((row >= value - LOGPROB_TOLERANCE).sum())
    assert least <= rank <= most, (token, rank, least, most)


def assert_logprobs_match(expected: torch.Tensor, output_ids: list[int], logprobs: list, k: int) -> None:
    """Each token's logprob and its top k (as (token id, logprob) pairs, most likely first) equal
    transformers' within LOGPROB_TOLERANCE; top ids may only differ where transformers sees a tie.
    Each of `logprobs` is (logprob, top), or (logprob, top, rank) as the engine's TokenLogprobs,
    whose rank is checked too."""
    assert len(logprobs) == len(output_ids)
    for i, (token, lp) in enumerate(zip(output_ids, logprobs)):
        row, (logprob, top) = expected[i], lp[:2]
        assert abs(logprob - row[token].item()) < LOGPROB_TOLERANCE, (i, logprob, row[token].item())
        if len(lp) > 2:
            assert_rank_matches(row, token, lp[2])
        values, ids = row.topk(k)
        assert len(top) == k
        for (tid, value), ref_id, ref in zip(top, ids.tolist(), values.tolist()):
            assert abs(value - ref) < LOGPROB_TOLERANCE and abs(row[tid].item() - value) < LOGPROB_TOLERANCE, (i, tid, ref_id)

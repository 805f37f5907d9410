"""What the engine reports about a request after a step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class TokenLogprobs(NamedTuple):
    """Log-probabilities around one sampled token: the log-softmax of the model's raw logits
    (before temperature, top-k/top-p or min_tokens touch them), as vLLM reports by default.
    A tuple, so it travels as a plain array (msgpack on the KV wire)."""

    logprob: float  # the sampled token's
    top: tuple[tuple[int, float], ...]  # the k most likely (token id, logprob), most likely first
    rank: int  # the token's place among all (1: the most likely), as vLLM counts it: tokens at least as likely


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    new_token_ids: list[int]  # the ones produced since the last report
    text: str = ""  # every output text so far (empty when the engine has no tokenizer)
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" or (prefill role) "prefilled"
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    first_scheduled_time: float | None = None  # time.perf_counter() of the request's first step
    block_ids: list[int] = field(default_factory=list)  # prefill role: blocks holding the prompt's KV
    logprobs: list[TokenLogprobs] | None = None  # one per output token so far, when params.logprobs asked
    # When params.prompt_logprobs asked, once this engine has computed the prompt: one per prompt
    # token, the first None (as vLLM's). A decode-only engine, given the prompt's KV, has none.
    prompt_logprobs: list[TokenLogprobs | None] | None = None

"""What the engine reports about a request after a step."""

from __future__ import annotations

from dataclasses import dataclass, field


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

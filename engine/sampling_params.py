"""Per-request sampling options, validated once when they are built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # most top logprobs one token may ask for (OpenAI's top_logprobs limit)
# A temperature below this samples as greedy (vLLM's bound too): logits divided by a float32 that
# small overflow to inf, and the draw would be NaN.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: as many as the context leaves (LLMEngine.add_request sets it)
    temperature: float = 1.0  # 0 (or under GREEDY_BELOW) = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = off
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0  # in [0, 1]: drop tokens less likely than min_p x the likeliest one; 0 = off
    # As OpenAI and vLLM: presence and frequency over the output's tokens (logit -= presence if the
    # token occurred + frequency x its count), in [-2, 2]; repetition over prompt and output (as
    # transformers' repetition_penalty: a positive logit divided by it, a negative one multiplied), > 0.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # (token id, added to its logit): clamped to [-100, 100], as vLLM does (OpenAI's range).
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    allowed_token_ids: tuple[int, ...] | None = None  # vLLM's: only these may be sampled; None = any
    bad_words: tuple[str, ...] = field(default=())  # vLLM's: words the output may not contain, as
    bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=())  # the tokenizer spells them (Tokenizer.bad_word_ids)
    seed: int | None = None  # per-request seed: the same seed gives the same tokens
    stop: tuple[str, ...] = field(default=())  # stop strings; not included in the output text unless:
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # in the output text (as vLLM's); logprobs' token texts keep them
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many output tokens
    logprobs: int | None = None  # report each token's logprob and this many top ones (0-20); None: off
    # vLLM's: each prompt token's logprob given the tokens before it, and this many top ones (0-20).
    # The prompt is then computed whole (no prefix cache hit), as vLLM does.
    prompt_logprobs: int | None = None
    mock_output_len: int | None = None  # honoured by mock engines only: output token n is EOS (a trace's length)

    def __post_init__(self) -> None:
        # Accept lists (or a single string) from callers, store tuples so the object stays hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        object.__setattr__(self, "bad_words", (self.bad_words,) if isinstance(self.bad_words, str) else tuple(self.bad_words))
        object.__setattr__(self, "bad_words_token_ids", tuple(tuple(ids) for ids in self.bad_words_token_ids))
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 (or None: up to the context), got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or >= 1, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias):
                raise ValueError(f"logit_bias values must be numbers, got {bias!r} for token {token}")
        object.__setattr__(self, "logit_bias", tuple((t, min(100.0, max(-100.0, b))) for t, b in self.logit_bias))
        if self.allowed_token_ids is not None and (not self.allowed_token_ids or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.allowed_token_ids)):  # fmt: skip
            raise ValueError(f"allowed_token_ids must be a non-empty list of token ids (integers >= 0), got {self.allowed_token_ids!r}")
        if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise ValueError("bad_words must be non-blank strings")
        if any(not ids or any(not isinstance(t, int) or t < 0 for t in ids) for ids in self.bad_words_token_ids):
            raise ValueError("bad_words_token_ids must be non-empty lists of token ids")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        if self.mock_output_len is not None and (not isinstance(self.mock_output_len, int) or self.mock_output_len < 1):
            raise ValueError(f"mock_output_len must be an integer >= 1, got {self.mock_output_len!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

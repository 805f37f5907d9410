"""A request's state inside one engine: plain data, changed only by the Scheduler.

    token_ids:  [ prompt ........................ | output ....... ]
                 0        num_computed_tokens ^          len(token_ids)
    The KV of token_ids[:num_computed_tokens] is in the blocks of `block_table`. A step
    computes the next `num_scheduled_tokens`; when that reaches the end of token_ids the
    step also samples one new token.

A sequence that arrives from a prefill worker is simply one whose prompt is already
computed: num_computed_tokens == num_prompt_tokens and its first output token is present.

A request moved here from another worker (its worker died) arrives with the tokens it had
already produced at the end of its prompt, and `output_offset` = how many they are: its
outputs count from there, for max_tokens and for the seeded sampler's token index.
"""

from __future__ import annotations

import enum

from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # holds no blocks (new, or preempted)
    RUNNING = "running"  # holds blocks; being prefilled or decoded
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's maximum length
    ABORT = "abort"  # cancelled by the caller
    PREFILLED = "prefilled"  # prefill-only role: first token sampled, KV blocks held for transfer


class Sequence:
    def __init__(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
        prefill_only: bool = False, output_offset: int = 0,
    ):  # fmt: skip
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.output_offset = output_offset  # outputs produced before this prompt's end, elsewhere
        self.params = params
        self.prefill_only = prefill_only
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None  # time.perf_counter() of its first step
        self.logprobs: list[TokenLogprobs] = []  # one per output token, when params.logprobs asks
        # When params.prompt_logprobs asks: one per prompt token computed so far, the first None
        # (nothing comes before it); complete once it has num_prompt_tokens.
        self.prompt_logprobs: list[TokenLogprobs | None] = [None] if params.prompt_logprobs is not None else []
        self.penalties = None  # engine.sampler.Penalties of a penalized request, made at its first step

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={len(self)}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_index(self) -> int:
        """Index, in the request's whole output, of the next token to sample."""
        return self.output_offset + self.num_output_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Asked for, and not all computed yet: every prompt row must be (no prefix cache hit)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

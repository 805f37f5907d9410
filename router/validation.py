"""Turning a GenerateRequest into prompt token ids and SamplingParams, or a clear refusal."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from protos import generation_pb2 as pb

DEFAULT_MAX_TOKENS = 16


class InvalidRequest(ValueError):
    """Becomes INVALID_ARGUMENT, with this message."""


@dataclass(frozen=True)
class ModelLimits:
    max_model_len: int
    vocab_size: int


def prompt_token_ids(request: pb.GenerateRequest, tokenizer) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("the request has no input: set one of prompt, messages or token_ids")
    if kind != "token_ids" and tokenizer is None:
        raise InvalidRequest("this model has no tokenizer: send token_ids")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidRequest("the prompt is empty")
        return tokenizer.encode(request.prompt)
    if kind == "messages":
        messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        if not messages:
            raise InvalidRequest("messages is empty")
        if any(not m["role"] for m in messages):
            raise InvalidRequest("every message needs a role")
        try:
            return tokenizer.encode_chat(messages)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
    if not request.token_ids.ids:
        raise InvalidRequest("token_ids is empty")
    return list(request.token_ids.ids)


def validate(request: pb.GenerateRequest, tokenizer, limits: ModelLimits) -> tuple[list[int], SamplingParams]:
    ids = prompt_token_ids(request, tokenizer)
    if not ids:
        raise InvalidRequest("the input is empty after tokenization")
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    room = limits.max_model_len - len(ids)
    if room < 1:
        raise InvalidRequest(
            f"the prompt has {len(ids)} tokens; this model's maximum length is {limits.max_model_len} "
            f"(prompt plus at least one new token)"
        )
    s = request.sampling
    if s.HasField("max_tokens"):
        if s.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {s.max_tokens}")
        if s.max_tokens > room:
            raise InvalidRequest(
                f"max_tokens {s.max_tokens} goes beyond the model's maximum length: the prompt has "
                f"{len(ids)} tokens, so at most {room} new tokens fit in {limits.max_model_len}"
            )
        max_tokens = s.max_tokens
    else:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if math.isnan(temperature):
        raise InvalidRequest("temperature is NaN")
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") else 0,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop),
            ignore_eos=s.ignore_eos,
            mock_output_len=s.mock_output_len if s.HasField("mock_output_len") else None,
        )
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    return ids, params

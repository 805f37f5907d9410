"""One check for both front ends: a RequestSpec (what a gRPC or OpenAI HTTP request asks for,
in neutral form) becomes prompt token ids and SamplingParams, or an InvalidRequest with the reason."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TypeVar

from engine.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 16
MAX_REQUEST_ID_BYTES = 256  # the id travels in every control message about the request (KV frames are bounded)


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's error code: clients match it to shorten the conversation


class InvalidRequest(ValueError):
    """Becomes INVALID_ARGUMENT (HTTP 400), with this message and, when one field is at fault,
    its name (OpenAI's error `param`) and, for a few, OpenAI's error `code`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def _too_long(max_model_len: int, detail: str, param: str) -> InvalidRequest:
    # The first sentence is OpenAI's and vLLM's, word for word: client libraries look for it too.
    return InvalidRequest(f"This model's maximum context length is {max_model_len} tokens. However, {detail}", param, CONTEXT_LENGTH_EXCEEDED)


@dataclass(frozen=True)
class ModelLimits:
    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class RequestSpec:
    """A generation request as a front end received it, nothing checked yet. The input is one of
    prompt, messages ({"role", "content"} dicts, rendered with the chat template) or token_ids;
    None means "not given" everywhere."""

    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    add_generation_prompt: bool = True  # messages only: as the chat template's flag
    continue_final_message: bool = False  # messages only: the text ends inside the final message
    chat_template_kwargs: dict | None = None  # messages only: more of the chat template's variables
    # The tokenizer's special tokens (BOS...) around a text input; None: yes for a prompt, no for
    # messages (their template places them), as vLLM's defaults.
    add_special_tokens: bool | None = None
    # vLLM's: keep only the prompt's last k tokens; -1: as many as leave room for max_tokens (or one)
    truncate_prompt_tokens: int | None = None
    token_ids: tuple[int, ...] | None = None
    max_tokens: int | None = None
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS  # when max_tokens is not given; None: as many as fit
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    mock_output_len: int | None = None  # honoured by mock engines only (a trace's output length)


T = TypeVar("T")


async def off_the_loop(specs: list[RequestSpec], check: Callable[[], T]) -> T:
    """`check()`, on a thread if it tokenizes text or renders a chat (the tokenizer lets go of
    the GIL): a batch of long prompts takes seconds, and the front ends share the router's event
    loop with every stream. Token ids are checked in place."""
    if all(spec.token_ids is not None for spec in specs):
        return check()
    return await asyncio.to_thread(check)


def check_request_id(request_id: str) -> str:
    if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequest(f"the request id has {len(request_id.encode())} bytes; at most {MAX_REQUEST_ID_BYTES} are allowed")
    return request_id


def prompt_token_ids(spec: RequestSpec, tokenizer, max_tokens: int) -> list[int]:
    """The input's token ids. Text that could not fit in max_tokens is refused before it is
    tokenized: tokenizing holds the router's loop (and the GIL) for ~1 s per MB of text."""
    given = [name for name in ("prompt", "messages", "token_ids") if getattr(spec, name) is not None]
    if not given:
        raise InvalidRequest("the request has no input: set one of prompt, messages or token_ids")
    if len(given) > 1:
        raise InvalidRequest(f"the request has more than one input ({', '.join(given)}): set only one")
    if spec.messages is None and (spec.continue_final_message or not spec.add_generation_prompt or spec.chat_template_kwargs):
        raise InvalidRequest("add_generation_prompt, continue_final_message and chat_template_kwargs apply to messages only")
    if given[0] != "token_ids":
        if tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: send token_ids")
        chars = len(spec.prompt) if spec.prompt is not None else sum(len(m.get("content") or "") for m in spec.messages)
        chars += len(json.dumps(spec.chat_template_kwargs, default=str)) if spec.chat_template_kwargs else 0  # a template may render them
        if chars > max_tokens * tokenizer.max_token_chars:
            raise _too_long(max_tokens, f"the {given[0]} text has {chars} characters: more than {max_tokens} tokens can hold.", given[0])
    if spec.prompt is not None:
        if not spec.prompt:
            raise InvalidRequest("the prompt is empty", "prompt")
        return tokenizer.encode(spec.prompt, add_special_tokens=spec.add_special_tokens is not False)
    if spec.messages is not None:
        if not spec.messages:
            raise InvalidRequest("messages is empty", "messages")
        if any(not m.get("role") for m in spec.messages):
            raise InvalidRequest("every message needs a role", "messages")
        try:
            return tokenizer.encode_chat(list(spec.messages), spec.add_generation_prompt, spec.continue_final_message, bool(spec.add_special_tokens),
                                         spec.chat_template_kwargs)  # fmt: skip
        except ValueError as e:
            raise InvalidRequest(str(e), "messages") from None
    if not spec.token_ids:
        raise InvalidRequest("token_ids is empty", "token_ids")
    return list(spec.token_ids)


def validate(spec: RequestSpec, tokenizer, limits: ModelLimits) -> tuple[list[int], SamplingParams]:
    ids = prompt_token_ids(spec, tokenizer, limits.max_model_len)
    if not ids:
        raise InvalidRequest("the input is empty after tokenization", _input(spec))
    if spec.truncate_prompt_tokens is not None:
        keep = limits.max_model_len - (spec.max_tokens or 1) if spec.truncate_prompt_tokens == -1 else spec.truncate_prompt_tokens
        if keep < 1 or spec.truncate_prompt_tokens < -1:
            raise InvalidRequest(f"truncate_prompt_tokens must be -1 or >= 1 (and leave a token), got {spec.truncate_prompt_tokens}", "truncate_prompt_tokens")
        if keep > limits.max_model_len:
            raise InvalidRequest(f"truncate_prompt_tokens {keep} is more than the model's maximum length {limits.max_model_len}", "truncate_prompt_tokens")
        ids = ids[-keep:]
    for what, param, tokens in (("token id", _input(spec), ids), ("stop token id", "stop_token_ids", spec.stop_token_ids),
                                ("logit_bias token id", "logit_bias", [t for t, _ in spec.logit_bias]),
                                ("allowed token id", "allowed_token_ids", spec.allowed_token_ids or ())):  # fmt: skip
        bad = next((t for t in tokens if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{what} {bad} is outside the vocabulary [0, {limits.vocab_size})", param)
    room = limits.max_model_len - len(ids)
    if room < 1:
        detail = f"your request has {len(ids)} input tokens, and at least one new token must fit. Please reduce the length of the input."
        raise _too_long(limits.max_model_len, detail, _input(spec))
    if spec.max_tokens is not None:
        if spec.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {spec.max_tokens}", "max_tokens")
        if spec.max_tokens > room:
            detail = (f"you requested {len(ids) + spec.max_tokens} tokens ({len(ids)} in the input, {spec.max_tokens} in the completion): "
                      f"max_tokens can be at most {room}. Please reduce the length of the input or max_tokens.")  # fmt: skip
            raise _too_long(limits.max_model_len, detail, "max_tokens")
        max_tokens = spec.max_tokens
    else:
        max_tokens = min(spec.default_max_tokens or room, room)
    temperature = 1.0 if spec.temperature is None else spec.temperature
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if getattr(spec, name) is not None and math.isnan(getattr(spec, name)):
            raise InvalidRequest(f"{name} is NaN", name)
    given = {name: getattr(spec, name) for name in ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
             if getattr(spec, name) is not None}  # fmt: skip
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if spec.top_p is None else spec.top_p,
            top_k=0 if spec.top_k is None else spec.top_k,
            seed=spec.seed,
            stop=spec.stop,
            include_stop_str_in_output=spec.include_stop_str_in_output,
            skip_special_tokens=spec.skip_special_tokens,
            stop_token_ids=spec.stop_token_ids,
            ignore_eos=spec.ignore_eos,
            min_tokens=spec.min_tokens,
            logprobs=spec.logprobs,
            prompt_logprobs=spec.prompt_logprobs,
            mock_output_len=spec.mock_output_len,
            logit_bias=spec.logit_bias,
            allowed_token_ids=spec.allowed_token_ids,
            bad_words=spec.bad_words,
            **given,
        )
    except ValueError as e:
        raise InvalidRequest(str(e), _field_named(str(e))) from None
    if params.bad_words:
        if tokenizer is None:
            raise InvalidRequest("bad_words needs the model's tokenizer, and this model has none", "bad_words")
        params = replace(params, bad_words_token_ids=tokenizer.bad_word_ids(params.bad_words, limits.vocab_size))
    return ids, params


def _input(spec: RequestSpec) -> str:
    """The field that holds the request's input."""
    return "messages" if spec.messages is not None else "token_ids" if spec.token_ids is not None else "prompt"


def _field_named(message: str) -> str | None:
    """The request field a SamplingParams error is about: its messages begin with the field's name."""
    name = message.split(" ", 1)[0]
    return name if name in _FIELDS else None


_FIELDS = frozenset(f.name for f in fields(RequestSpec))

"""The OpenAI-compatible HTTP front end: POST /v1/chat/completions and /v1/completions (streamed
as server-sent events ending in `data: [DONE]`, or whole), GET /v1/models (and /v1/models/ID),
/health, /version, and vLLM's POST /tokenize and /detokenize.

A thin adapter, like the gRPC server beside it: each request becomes a RequestSpec for the one
validation (router.validation) and goes to the same Router (one request path, one set of
metrics); its chunks come back in OpenAI's JSON. FastAPI + uvicorn, the stack vLLM and SGLang
serve this API with, so clients meet the same request parsing, SSE framing and error shapes.
uvicorn runs as a task on the router's own asyncio loop, not in another process: the Router's
state belongs to that loop.

Errors are shaped as OpenAI's, {"error": {"message", "type", "param", "code"}}, with the status
of the gRPC code the same failure gets there:
  400 INVALID_ARGUMENT    bad input (the same checks as gRPC), or an option not served here
  401 UNAUTHENTICATED     no valid API key (router.auth)
  404 NOT_FOUND           an unknown model or route
  413                     a request body over MAX_BODY_BYTES
  429 RESOURCE_EXHAUSTED  no KV room within the admission timeout
  503 UNAVAILABLE         no worker can serve it (and GET /health while the cluster cannot serve)
  500 INTERNAL            a bug (logged)
A stream holds its response headers until the first token, so admission errors still get their
status; a later failure ends the stream with a `data: {"error": ...}` event before [DONE]. A
client that disconnects, streaming or not, aborts its request on every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from engine.outputs import TokenLogprobs
from engine.sampling_params import MAX_LOGPROBS
from router.auth import Auth
from router.router import Chunk, RequestError, Router, unless_first
from router.server import ModelInfo
from router.validation import InvalidRequest, ModelLimits, RequestSpec, check_request_id, off_the_loop, prompt_token_ids, validate

logger = logging.getLogger(__name__)

# gRPC code name -> HTTP status, OpenAI error type, OpenAI error code
ERRORS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", None),
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),
    "PERMISSION_DENIED": (403, "invalid_request_error", "permission_denied"),
    "NOT_FOUND": (404, "invalid_request_error", "not_found"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "resource_exhausted"),
    "CANCELLED": (499, "invalid_request_error", "cancelled"),
    "INTERNAL": (500, "server_error", "internal_error"),
    "UNAVAILABLE": (503, "server_error", "unavailable"),
    "DEADLINE_EXCEEDED": (504, "server_error", "deadline_exceeded"),
}
STATUS_CODES = {status: name for name, (status, _, _) in ERRORS.items()}


class ApiError(Exception):
    """code: a gRPC code's name (ERRORS); error_code: OpenAI's error `code` where more precise than the status's."""

    def __init__(self, code: str, message: str, param: str | None = None, error_code: str | None = None):
        super().__init__(message)
        self.code, self.param, self.error_code = code, param, error_code

    def response(self) -> JSONResponse:
        status, kind, code = ERRORS[self.code]
        return JSONResponse(error_body(str(self), kind, self.error_code or code, self.param), status_code=status)


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- requests (the fields OpenAI and vLLM define; unknown ones are ignored, as both do) ---------


class _Body(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """An explicit null stands for the default, as in OpenAI's schema (clients that send every
        field send nulls): only fields whose default is None would take it as a value."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].default is None}
        return data


class StreamOptions(_Body):
    include_usage: bool = True  # as vLLM's: stream_options given means usage wanted, unless it says not
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


# A batch of 256 prompts of 16k tokens each fits; a larger body is refused before it is parsed.
MAX_BODY_BYTES = 32 << 20

# Each choice of each prompt is an engine request of its own, so both are bounded as a request count is.
MAX_CHOICES = 16  # n
MAX_REQUESTS = 256  # prompts x n

# vLLM's options that this server does not serve, each with the value that leaves the output as
# ours is: any other value is refused rather than ignored, since it would change the output.
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "structural_tag")
UNSERVED = {**dict.fromkeys(GUIDED), "use_beam_search": False, "length_penalty": 1.0, "logits_processors": None, "spaces_between_special_tokens": True, "prompt_embeds": None}
UNSERVED_CHAT = {**UNSERVED, "functions": None, "echo": False, "chat_template": None, "documents": None,
                 "audio": None, "prediction": None, "modalities": ["text"]}  # fmt: skip
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # as vLLM's: a seed is an int64
_SCALARS = frozenset((int, float, bool, type(None)))


class _Text(_Body):
    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data):
        """JSON's escapes can spell a lone UTF-16 surrogate ("\\ud800"), which parses into a str that
        is not text: the tokenizer, and any reply that quotes it, would fail on it (a 500). Refused
        here, for every string of the body, without quoting it."""
        stack = [data]
        while stack:
            value = stack.pop()
            if isinstance(value, str):
                if not value.isascii():
                    try:
                        value.encode()
                    except UnicodeEncodeError:
                        raise ValueError("a string holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape): not text") from None
            elif isinstance(value, dict):
                stack += value.keys()
                stack += value.values()
            elif isinstance(value, list) and not _SCALARS.issuperset(map(type, value)):  # token ids are skipped in C
                stack += value
        return data


class _Common(_Text):
    model_config = ConfigDict(extra="allow")  # unknown fields stay ignored; UNSERVED ones are looked for
    unserved: ClassVar[dict] = UNSERVED

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None  # token id (a string in JSON) -> bias
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    repetition_penalty: float | None = None
    add_special_tokens: bool | None = None  # vLLM's: the tokenizer's BOS and the like around a prompt; None: the endpoint's default
    return_tokens_as_token_ids: bool = False
    response_format: dict | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # as vLLM's: each prompt token's, with this many top ones

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) for an option that would change the output and is not served here."""
        if not 1 <= self.n <= MAX_CHOICES:
            return "n", f"n must be in [1, {MAX_CHOICES}], got {self.n}"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only the text response_format is supported"
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:  # as vLLM's: {} passes
            return "stream_options", "stream_options is only for stream=true"
        for name, value in (self.model_extra or {}).items():
            if name in self.unserved and value not in (self.unserved[name], None, [], {}):
                if name in GUIDED:
                    return name, f"{name} is not supported: this server does not constrain the output"
                return name, f"{name}={json.dumps(value)[:40]} is not supported"
        return None

    def sampling(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None) -> dict:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    repetition_penalty=self.repetition_penalty, logit_bias=tuple((self.logit_bias or {}).items()), seed=self.seed, stop=stop,
                    allowed_token_ids=None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
                    truncate_prompt_tokens=self.truncate_prompt_tokens, bad_words=tuple(self.bad_words or ()),
                    stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                    include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
                    add_special_tokens=self.add_special_tokens,
                    logprobs=logprobs, prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs)  # fmt: skip


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # the participant's: passed to the chat template, which may show it
    # An assistant's earlier calls: this server serves no tools, and dropping them would leave a
    # conversation the model never saw, so they are refused.
    tool_calls: list | None = None
    function_call: dict | None = None

    def text(self) -> str:
        if self.tool_calls or self.function_call:
            raise ApiError("INVALID_ARGUMENT", "messages with tool_calls are not supported: this server serves no tools", "messages")
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.type != "text" for part in self.content):
            raise ApiError("INVALID_ARGUMENT", "only text content parts are supported", "messages")
        return "\n".join(part.text or "" for part in self.content)

    @staticmethod
    def dicts(messages: list[ChatMessage]) -> tuple[dict, ...]:
        return tuple({"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages)


class ChatCompletionRequest(_Common):
    unserved: ClassVar[dict] = UNSERVED_CHAT
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    tool_choice: str | dict | None = None
    # vLLM's: the template's generation prompt; or the prompt ends inside the final message, which the reply continues
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None  # vLLM's: more of the template's variables (enable_thinking=false...)

    def specs(self) -> list[RequestSpec]:
        if self.top_logprobs and not self.logprobs:
            raise ApiError("INVALID_ARGUMENT", "top_logprobs needs logprobs set to true", "top_logprobs")
        if self.tools:
            raise ApiError("INVALID_ARGUMENT", "tools are not supported", "tools")
        if self.tool_choice not in (None, "none"):
            raise ApiError("INVALID_ARGUMENT", "tool_choice needs tools, which are not supported", "tool_choice")
        messages = ChatMessage.dicts(self.messages)
        max_tokens = self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        sampling = self.sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)
        # As vLLM: without a limit, a chat reply may fill the model's context.
        return [RequestSpec(messages=messages, add_generation_prompt=self.add_generation_prompt,
                            continue_final_message=self.continue_final_message, chat_template_kwargs=self.chat_template_kwargs,
                            default_max_tokens=None, **sampling)]  # fmt: skip


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def scores_only(self) -> bool:
        return self.echo and self.max_tokens == 0

    def specs(self) -> list[RequestSpec]:
        """One spec per prompt: a list of texts or of token-id lists is a batch, as OpenAI's and vLLM's."""
        for param, given in (("suffix", self.suffix), ("best_of", self.best_of not in (None, 1))):
            if given:
                raise ApiError("INVALID_ARGUMENT", f"{param} is not supported", param)
        batch = isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list))
        prompts = self.prompt if batch else [self.prompt]
        if len(prompts) * self.n > MAX_REQUESTS:
            raise ApiError("INVALID_ARGUMENT", f"{len(prompts)} prompts x n={self.n} is more than {MAX_REQUESTS} requests", "prompt")
        # Echo with logprobs: the prompt's tokens and their logprobs come before the output's, as OpenAI's (vLLM's) legacy API.
        echoed = max(self.logprobs, self.prompt_logprobs or 0) if self.echo and self.logprobs is not None else None
        # Echo with max_tokens 0 scores the prompt alone: one token is generated and not shown (as vLLM).
        sampling = self.sampling(1 if self.scores_only else self.max_tokens, self.logprobs, echoed)
        return [RequestSpec(prompt=p, **sampling) if isinstance(p, str) else RequestSpec(token_ids=tuple(p), **sampling)
                for p in prompts]  # fmt: skip


class TokenizeRequest(_Text):
    """vLLM's POST /tokenize: a prompt, or chat messages rendered as the chat endpoint renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # None: as the completion and chat endpoints' defaults
    chat_template_kwargs: dict | None = None

    def spec(self) -> RequestSpec:
        messages = None if self.messages is None else ChatMessage.dicts(self.messages)
        return RequestSpec(prompt=self.prompt, messages=messages, add_generation_prompt=self.add_generation_prompt,
                           continue_final_message=self.continue_final_message, add_special_tokens=self.add_special_tokens,
                           chat_template_kwargs=self.chat_template_kwargs)  # fmt: skip


class DetokenizeRequest(_Text):
    model: str | None = None
    tokens: list[int]


# --- responses -----------------------------------------------------------------------------------


@dataclass
class _Render:
    """One choice's responses: the request's id, the endpoint's shapes, and what the choice has produced so far."""

    chat: bool
    id: str
    model: str
    with_logprobs: bool  # the request asked for them
    token_text: Callable[[int], str]  # a token id's text in logprobs
    created: int
    index: int = 0  # the choice's: prompt i's choice j is i * n + j
    prompt_tokens: int = 0
    echo: str = ""  # completions' echo: the prompt's text, put before the choice's first text
    prompt_ids: list[int] | None = None  # when prompt logprobs are asked: the prompt, for their tokens
    show_prompt_logprobs: bool = False  # vLLM's prompt_logprobs field was asked (else echo with logprobs asked for them)
    completion_tokens: int = 0
    text_offset: int = 0  # completions' logprobs: where the next token's text starts
    first: bool = True
    prompt_only: bool = False  # completions' echo with max_tokens 0: the prompt alone, its one generated token dropped

    def envelope(self, choices: list[dict], stream: bool) -> dict:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def choice(self, text: str, token_ids: list[int], logprobs: list[TokenLogprobs] | None, finish_reason: str | None,
               stream: bool, prompt_logprobs: list[TokenLogprobs | None] | None = None, stop_reason: str | int | None = None) -> dict:  # fmt: skip
        """prompt_logprobs: on the choice's first chunk, when asked (completions only: chat's go
        on the response, prompt_logprobs()). stop_reason: vLLM's, the stop string or token id that
        ended the choice (None until then, and for EOS or a length limit)."""
        if not self.chat:
            if self.prompt_only:
                text, token_ids, logprobs, self.completion_tokens = "", [], [], 0
            extra = {}
            if prompt_logprobs is not None and self.show_prompt_logprobs:
                extra["prompt_logprobs"] = self.prompt_logprobs(prompt_logprobs)
            if prompt_logprobs is not None and self.echo and self.with_logprobs:
                token_ids, logprobs = self.prompt_ids + token_ids, prompt_logprobs + (logprobs or [])
            lp = self.logprobs(token_ids, logprobs or []) if self.with_logprobs else None
            text, self.echo = self.echo + text, ""
            return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": finish_reason, "stop_reason": stop_reason, **extra}
        lp = self.logprobs(token_ids, logprobs or []) if self.with_logprobs else None
        if not stream:
            message = {"role": "assistant", "content": text}
            return {"index": self.index, "message": message, "logprobs": lp, "finish_reason": finish_reason, "stop_reason": stop_reason}
        delta = {"role": "assistant", "content": text} if self.first else {"content": text}
        self.first = False
        return {"index": self.index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason, "stop_reason": stop_reason}

    def prompt_logprobs(self, logprobs: list[TokenLogprobs | None]) -> list[dict | None]:
        """vLLM's shape: per prompt token, None (the first) or {token id: {logprob, rank,
        decoded_token}} for the token itself and the top ones (rank: 1 for the most likely)."""
        out: list[dict | None] = []
        for token, lp in zip(self.prompt_ids, logprobs):
            if lp is None:
                out.append(None)
                continue
            top = {str(t): {"logprob": v, "rank": rank, "decoded_token": self.token_text(t)} for rank, (t, v) in enumerate(lp.top, 1)}
            own = {str(token): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": self.token_text(token)}}
            out.append(top if str(token) in top else own | top)
        return out

    def logprobs(self, token_ids: list[int], logprobs: list[TokenLogprobs | None]) -> dict:
        if self.chat:
            def entry(token, logprob):
                text = self.token_text(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(tt, v) for tt, v in lp.top]}
                                for t, lp in zip(token_ids, logprobs)]}  # fmt: skip
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(token)
        # As vLLM: the top ones and the chosen one, by text; an echoed prompt's first token has none (null).
        top = [None if lp is None else {self.token_text(tt): v for tt, v in lp.top} | {self.token_text(t): lp.logprob}
               for t, lp in zip(token_ids, logprobs)]  # fmt: skip
        token_logprobs = [None if lp is None else lp.logprob for lp in logprobs]
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_prompt_logprobs(render: _Render, prompt_logprobs: list[TokenLogprobs | None] | None) -> dict:
    """Chat's prompt logprobs go on the response, as vLLM's (its choices share one prompt)."""
    if not (render.chat and render.show_prompt_logprobs and prompt_logprobs is not None):
        return {}
    return {"prompt_logprobs": render.prompt_logprobs(prompt_logprobs)}


def _usage(renders: list[_Render], n: int) -> dict:
    """The request's usage: each prompt once (its n choices share it), every choice's completion."""
    prompt, completion = sum(r.prompt_tokens for r in renders[::n]), sum(r.completion_tokens for r in renders)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


# --- the app -------------------------------------------------------------------------------------


def _unauthenticated() -> ApiError:
    return ApiError("UNAUTHENTICATED", "a valid API key is required: send 'Authorization: Bearer KEY'")


class OpenAIApi:
    def __init__(self, router: Router, model: ModelInfo, auth: Auth = Auth(), allowed_origins: tuple[str, ...] = ()):
        self.router = router
        self.model = model
        self.limits = ModelLimits(model.max_model_len, model.vocab_size)
        self.auth = auth
        self.allowed_origins = allowed_origins
        self.created = int(time.time())

    def app(self) -> FastAPI:
        app = FastAPI(title="pdserve", version=_version(), docs_url=None, redoc_url=None, openapi_url=None)
        caller = [Depends(self.caller)]
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"], dependencies=caller)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"], dependencies=caller)
        app.add_api_route("/v1/models", self.models, methods=["GET"], dependencies=caller)
        app.add_api_route("/v1/models/{model:path}", self.model_card, methods=["GET"], dependencies=caller)
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"], dependencies=caller)
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"], dependencies=caller)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/version", lambda: {"version": _version()}, methods=["GET"])
        app.add_exception_handler(ApiError, lambda request, e: e.response())
        app.add_exception_handler(RequestError, lambda request, e: ApiError(e.code, str(e)).response())
        app.add_exception_handler(RequestValidationError, self._invalid_body)
        app.add_exception_handler(HTTPException, _http_error)
        app.add_exception_handler(Exception, _internal_error)
        app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
        if self.allowed_origins:  # none by default: a web page the user visits cannot call a local server (vLLM allows any)
            app.add_middleware(CORSMiddleware, allow_origins=list(self.allowed_origins), allow_methods=["*"], allow_headers=["*"])
        return app

    def caller(self, request: Request) -> str:
        caller = self.auth.caller(request.headers.get("authorization"))
        if caller is None:
            raise _unauthenticated()
        request.state.caller = caller
        return caller

    def _invalid_body(self, request: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI parses the JSON before it runs the key check: a caller without a key learns
        # nothing about the body, it gets the 401 a valid body would have had.
        if self.auth.caller(request.headers.get("authorization")) is None:
            return _unauthenticated().response()
        return _invalid_body(e)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._generate(body, request, chat=True)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._generate(body, request, chat=False)

    async def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    async def model_card(self, model: str) -> dict:
        self._check_model(model)
        return self._card()

    async def tokenize(self, body: TokenizeRequest) -> dict:
        self._check_model(body.model)
        spec = body.spec()
        try:
            ids = await off_the_loop([spec], lambda: prompt_token_ids(spec, self.router.tokenizer, self.model.max_model_len))
        except InvalidRequest as e:
            raise _invalid(e) from None
        return {"count": len(ids), "max_model_len": self.model.max_model_len, "tokens": ids}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self._check_model(body.model)
        if self.router.tokenizer is None:
            raise ApiError("INVALID_ARGUMENT", "this model has no tokenizer")
        bad = next((t for t in body.tokens if not 0 <= t < self.model.vocab_size), None)
        if bad is not None:
            raise ApiError("INVALID_ARGUMENT", f"token id {bad} is outside the vocabulary [0, {self.model.vocab_size})", "tokens")
        return {"prompt": self.router.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    def _card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": self.created, "owned_by": "pdserve", "root": self.model.name,
                "max_model_len": self.model.max_model_len}  # fmt: skip

    def _check_model(self, model: str | None) -> None:
        if model and model != self.model.name:  # as vLLM's: no name (or "") is the served model
            raise ApiError("NOT_FOUND", f"The model `{model}` does not exist (this server serves `{self.model.name}`).", "model")

    async def health(self) -> Response:
        if self.router.serving():
            return Response(status_code=200)
        if self.router.closed:
            return ApiError("UNAVAILABLE", "the server is shutting down").response()
        return ApiError("UNAVAILABLE", "no ready worker: the cluster cannot serve now").response()

    # --- one request ------------------------------------------------------------------------

    async def _generate(self, body: ChatCompletionRequest | CompletionRequest, request: Request, chat: bool) -> Response:
        self._check_model(body.model)
        if (refusal := body.unsupported()) is not None:
            raise ApiError("INVALID_ARGUMENT", refusal[1], refusal[0])
        prefix, n, caller = "chatcmpl" if chat else "cmpl", body.n, request.state.caller
        specs = body.specs()
        try:
            request_id = check_request_id(request.headers.get("x-request-id", "")) or f"{prefix}-{uuid.uuid4().hex}"
            if len(specs) * n > 1:
                check_request_id(f"{request_id}-{len(specs) * n - 1}")  # the longest of the requests' ids, below
            prompts = await off_the_loop(specs, lambda: [_validate(spec, self.router.tokenizer, self.limits, i if len(specs) > 1 else None)
                                                         for i, spec in enumerate(specs)])  # fmt: skip
        except InvalidRequest as e:
            raise _invalid(e) from None
        created, token_text = int(time.time()), self._token_text(body.return_tokens_as_token_ids)
        renders = []
        for i, (spec, (ids, params)) in enumerate(zip(specs, prompts)):
            echo = self._echo(spec, ids) if not chat and body.echo else ""
            renders += [_Render(chat, request_id, self.model.name, params.logprobs is not None, token_text, created, index=i * n + j,
                                prompt_tokens=len(ids), echo=echo, prompt_ids=ids if params.prompt_logprobs is not None else None,
                                show_prompt_logprobs=body.prompt_logprobs is not None,
                                prompt_only=not chat and body.scores_only) for j in range(n)]  # fmt: skip
        if len(renders) == 1:
            ids, params = prompts[0]
            chunks = _indexed(self.router.generate(request_id, ids, params, caller))
        else:  # as vLLM's n and batches: one request per choice (a seed s gives choice j the seed s + j), streamed together
            requests = [(f"{request_id}-{i * n + j}", ids, replace(params, seed=None if params.seed is None else params.seed + j))
                        for i, (ids, params) in enumerate(prompts) for j in range(n)]  # fmt: skip
            chunks = _merged([self.router.generate(*r, caller) for r in requests])
        if not body.stream:
            async with contextlib.aclosing(chunks):
                try:
                    return JSONResponse(await _unless_disconnected(request, self._whole(renders, n, chunks)))
                except _ClientGone:
                    return Response(status_code=499)
        try:  # the headers wait for the first token: a refusal before it still gets its status
            first = await _unless_disconnected(request, anext(chunks))
        except BaseException as e:
            await chunks.aclose()
            if isinstance(e, _ClientGone):
                return Response(status_code=499)
            raise
        events = self._events(renders, n, first, chunks, body.stream_options or StreamOptions(include_usage=False))
        # Starlette cancels the stream when the client goes; closing both generators afterwards
        # releases the request in the router (its workers abort and free its blocks).
        return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(_close, events, chunks))

    async def _whole(self, renders: list[_Render], n: int, chunks) -> dict:
        texts, token_ids, logprobs = ([[] for _ in renders] for _ in range(3))
        finish_reasons, stop_reasons, prompt_logprobs = [None] * len(renders), [None] * len(renders), [None] * len(renders)
        async for index, chunk in chunks:
            texts[index].append(chunk.text)
            token_ids[index] += chunk.token_ids
            logprobs[index] += chunk.logprobs or []
            finish_reasons[index], stop_reasons[index] = chunk.finish_reason, chunk.stop_reason
            prompt_logprobs[index] = prompt_logprobs[index] or chunk.prompt_logprobs
        choices = []
        for i, render in enumerate(renders):
            render.completion_tokens = len(token_ids[i])
            choices.append(render.choice("".join(texts[i]), token_ids[i], logprobs[i], finish_reasons[i], False, prompt_logprobs[i],
                                         stop_reasons[i]))  # fmt: skip
        return {**renders[0].envelope(choices, stream=False), **_chat_prompt_logprobs(renders[0], prompt_logprobs[0]),
                "usage": _usage(renders, n)}  # fmt: skip

    async def _events(self, renders: list[_Render], n: int, first: tuple[int, Chunk], chunks, options: StreamOptions):
        def usage(render: _Render) -> dict:
            """continuous_usage_stats: the chunk's choice's usage so far, as vLLM's (its prompt, its tokens)."""
            if not options.include_usage:
                return {}
            return {"usage": _usage([render], 1) if options.continuous_usage_stats else None}

        try:
            (index, chunk), streaming = first, len(renders)
            while True:
                render = renders[index]
                render.completion_tokens += len(chunk.token_ids)
                choice = render.choice(chunk.text, chunk.token_ids, chunk.logprobs, chunk.finish_reason, True, chunk.prompt_logprobs,
                                       chunk.stop_reason)  # fmt: skip
                yield _sse({**render.envelope([choice], stream=True), **_chat_prompt_logprobs(render, chunk.prompt_logprobs), **usage(render)})
                streaming -= chunk.finish_reason is not None
                if not streaming:
                    break
                index, chunk = await anext(chunks)
            if options.include_usage:
                yield _sse({**renders[0].envelope([], stream=True), "usage": _usage(renders, n)})
        except RequestError as e:
            _, kind, code = ERRORS[e.code]
            yield _sse(error_body(str(e), kind, code))
        except Exception as e:  # noqa: BLE001 - a bug: say so in the stream, and keep serving
            logger.exception("request %s failed", render.id)
            yield _sse(error_body(f"internal error: {e}", "server_error", "internal_error"))
        yield b"data: [DONE]\n\n"

    def _echo(self, spec: RequestSpec, ids: list[int]) -> str:
        """The prompt's text, as given or (token ids, or a truncated prompt) decoded."""
        if spec.prompt is not None and spec.truncate_prompt_tokens is None:
            return spec.prompt
        return "" if self.router.tokenizer is None else self.router.tokenizer.decode(ids, skip_special_tokens=False)

    def _token_text(self, as_ids: bool):
        if as_ids:
            return lambda token: f"token_id:{token}"
        tokenizer = self.router.tokenizer
        if tokenizer is None:
            return lambda token: ""
        return lambda token: tokenizer.decode([token], skip_special_tokens=False)


def _invalid(e: InvalidRequest) -> ApiError:
    # Token ids come in `prompt` here (gRPC's field is token_ids).
    return ApiError("INVALID_ARGUMENT", str(e), "prompt" if e.param == "token_ids" else e.param, e.code)


def _validate(spec: RequestSpec, tokenizer, limits: ModelLimits, index: int | None):
    """validate(), its reason naming the prompt of a batch."""
    try:
        return validate(spec, tokenizer, limits)
    except InvalidRequest as e:
        raise e if index is None else InvalidRequest(f"prompt {index}: {e}", e.param, e.code) from None


class _ClientGone(Exception):
    pass


async def _indexed(chunks) -> AsyncIterator[tuple[int, Chunk]]:
    """One request's chunks as choice 0's; closing this closes the request's stream."""
    try:
        async for chunk in chunks:
            yield 0, chunk
    finally:
        await chunks.aclose()


async def _merged(streams: list) -> AsyncIterator[tuple[int, Chunk]]:
    """The chunks of several requests' streams as (its index, chunk), in the order they come; the
    first error ends it. Closing it closes every stream (their requests are released)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((index, None, e))
        else:
            queue.put_nowait((index, None, None))  # this stream's end

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(pumps)
        while left:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                left -= 1
            else:
                yield index, chunk
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def _unless_disconnected(request: Request, awaitable):
    """Await `awaitable`, unless the client disconnects first: then cancel it (the router
    releases the request) and raise _ClientGone."""
    work = await unless_first(_disconnected(request), awaitable)
    if work.cancelled():
        raise _ClientGone()
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _close(*generators) -> None:
    for generator in generators:
        await generator.aclose()


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413, by its Content-Length before
    any of it is read, or (sent in chunks) once the chunks pass it: raised as an HTTPException from
    the body's reading, which FastAPI hands to _http_error."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await _http_error(None, self._too_large())(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self._too_large()
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is over {self.limit} bytes")


def _invalid_body(e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        return ApiError("INVALID_ARGUMENT", f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})").response()
    # A field of several types has an error per type: the one that got furthest into the value says most.
    field = _path(first.get("loc", ()))[:1]
    error = max((err for err in errors if _path(err.get("loc", ()))[:1] == field), key=lambda err: len(_path(err.get("loc", ()))), default=first)
    location = ".".join(_path(error.get("loc", ())))
    message = f"{location}: {error.get('msg', 'invalid request')}" if location else error.get("msg", "invalid request body")
    return ApiError("INVALID_ARGUMENT", message, field[0] if field else None).response()


_TYPE_NAMES = frozenset(("str", "int", "float", "bool", "list", "dict", "none"))


def _path(location: tuple) -> list[str]:
    """An error's location as the body's field names and indices: pydantic's own parts (the body,
    a union's branch such as "str" or "list[int]", a "[key]") left out."""
    return [str(p) for p in location if p != "body" and (isinstance(p, int) or (str(p).isidentifier() and p not in _TYPE_NAMES))]


def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    code = STATUS_CODES.get(e.status_code)
    status, kind, error_code = ERRORS[code] if code else (e.status_code, "invalid_request_error", None)
    return JSONResponse(error_body(str(e.detail), kind, error_code), status_code=status)


def _internal_error(request: Request, e: Exception) -> JSONResponse:
    # Starlette logs the traceback after this answer; the client gets the error's shape, not a plain-text 500.
    return ApiError("INTERNAL", f"internal error ({type(e).__name__}); the server's log has the details").response()


def _version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout on PYTHONPATH, never installed
        return "unknown (not installed)"


class HttpServer:
    """uvicorn serving the OpenAI API on the running asyncio loop."""

    def __init__(self, router: Router, model: ModelInfo, auth: Auth = Auth(), allowed_origins: tuple[str, ...] = ()):
        self.app = OpenAIApi(router, model, auth, allowed_origins).app()
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self, host: str, port: int, tls: tuple[str, str] | None = None) -> int:
        """Listen on host:port (0: any free port); tls = (certificate file, key file), PEM."""
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        config = uvicorn.Config(
            self.app, log_config=None, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5,
            ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError(f"the HTTP server on {host}:{port} stopped while starting")
            await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._task

"""The OpenAI-compatible HTTP front end and API keys on both front ends, through the real servers
and router, with the fake workers of test_router standing in for the Ray actors: response and
error shapes, statuses, stream framing. The real cluster's turn is in test_openai_api.py."""

import asyncio
import json

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_router import MODEL, FakeDecode, FakePrefill

from engine.tokenizer import Tokenizer
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc
from router import http_server
from router.auth import Auth
from router.http_server import HttpServer
from router.router import Router, RouterConfig
from router.server import Server
from router.workers import Role, WorkerRecord, WorkerState

KEYS = Auth.from_keys(["alice-key", "bob-key"], ["admin-key"])


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return Tokenizer(default_model_dir)


class Servers:
    """A router with fake workers behind its gRPC and HTTP servers, on the running loop."""

    def __init__(self, tokenizer, workers, auth=Auth(), scale=None, **config):
        self.router = Router(tokenizer, MODEL.block_size, RouterConfig(**config))
        self.grpc = Server(self.router, MODEL, "disaggregated", "grpc", scale, auth)
        self.http = HttpServer(self.router, MODEL, auth)
        self.workers = workers

    async def __aenter__(self):
        port = await self.grpc.start("127.0.0.1", 0)
        http_port = await self.http.start("127.0.0.1", 0)
        self.router._on_workers_changed = lambda: asyncio.get_running_loop().create_task(self.grpc.update_health())
        for worker_id, role, handle in self.workers:
            self.router.add_worker(WorkerRecord(worker_id, role, handle, state=WorkerState.READY))
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
        return self

    async def __aexit__(self, *exc):
        await self.client.aclose()
        await self.channel.close()
        await self.http.stop()
        await self.grpc.stop(0)
        await self.router.stop()


def pair():
    d = FakeDecode()
    return d, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))]


def events(response_text: str) -> list:
    """The SSE data of a stream, JSON-decoded ([DONE] as is)."""
    data = [line.removeprefix("data: ") for line in response_text.split("\n\n") if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def assert_error(response: httpx.Response, status: int, message: str, code=None, param=None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"], error
    assert (error["code"], error["param"]) == (code, param), error


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def test_chat_stream_framing_usage_and_a_whole_completion(tokenizer):
    async def body():
        d, workers = pair()
        async with Servers(tokenizer, workers) as s:
            d.script["chat-1"] = tokenizer.encode(" Hello world")
            stream = await s.client.post("/v1/chat/completions", headers={"x-request-id": "chat-1"},
                                         json={**CHAT, "model": MODEL.name, "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
            d.script["cmpl-1"] = [1000, 1001, 1002]
            whole = await s.client.post("/v1/completions", headers={"x-request-id": "cmpl-1"}, json={"prompt": [5, 6, 7]})
            models = await s.client.get("/v1/models")
        return stream, whole, models

    stream, whole, models = asyncio.run(body())
    assert stream.headers["content-type"].startswith("text/event-stream")
    chunks = events(stream.text)
    assert chunks[-1] == "[DONE]"
    *tokens, usage = chunks[:-1]
    assert [c["choices"][0]["delta"] for c in tokens] == [{"role": "assistant", "content": " Hello"}, {"content": " world"}]
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, "length"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chat-1" and c["usage"] is None for c in tokens)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": len(tokenizer.encode_chat(CHAT["messages"])),
                                                         "completion_tokens": 2, "total_tokens": usage["usage"]["prompt_tokens"] + 2}
    body = whole.json()
    assert body["object"] == "text_completion" and body["id"] == "cmpl-1" and body["model"] == MODEL.name
    assert body["choices"] == [{"index": 0, "text": tokenizer.decode([1000, 1001, 1002]), "logprobs": None, "finish_reason": "length",
                                "stop_reason": None}]  # fmt: skip
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert [m["id"] for m in models.json()["data"]] == [MODEL.name]


def test_n_choices_whole_streamed_and_refused_together(tokenizer):
    """n > 1: one request per choice, ids ID-0 ... ID-(n-1). Whole: the choices in order, usage
    with the prompt once. Streamed: each chunk one choice's, by its index. One choice refused:
    the whole request refused, and the choices already running aborted."""
    texts3, texts2 = [" one", " two two", " three three three"], [" a b", " c"]

    async def body():
        out = {}
        d, workers = pair()
        async with Servers(tokenizer, workers) as s:
            d.script.update({f"n3-{i}": tokenizer.encode(text) for i, text in enumerate(texts3)})
            out["whole"] = await s.client.post("/v1/completions", headers={"x-request-id": "n3"}, json={"prompt": "Hi", "n": 3})
            d.script.update({f"n2-{i}": tokenizer.encode(text) for i, text in enumerate(texts2)})
            options = {"include_usage": True, "continuous_usage_stats": True}
            out["stream"] = await s.client.post("/v1/chat/completions", headers={"x-request-id": "n2"},
                                                json={**CHAT, "n": 2, "stream": True, "stream_options": options})  # fmt: skip
            out["too many"] = await s.client.post("/v1/completions", json={"prompt": "Hi", "n": 17})
        d = FakeDecode(capacity=2)
        async with Servers(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))], admission_timeout=3) as s:
            d.script.update({f"part-{i}": [1000] * 2000 for i in range(3)})
            out["refused"] = await s.client.post("/v1/completions", headers={"x-request-id": "part"}, json={"prompt": "Hi", "n": 3})
            out["aborted"], out["holding"] = sorted(d.aborted), set(d.holding)
        return out

    out = asyncio.run(body())
    whole = out["whole"].json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in whole["choices"]] == [(i, text, "length") for i, text in enumerate(texts3)]
    prompt = len(tokenizer.encode("Hi"))
    completion = sum(len(tokenizer.encode(text)) for text in texts3)
    assert whole["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    *chunks, usage, done = events(out["stream"].text)
    assert done == "[DONE]" and all(len(c["choices"]) == 1 for c in chunks)
    for i, text in enumerate(texts2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["delta"]["content"] for c in mine) == text and mine[0]["delta"]["role"] == "assistant"
        assert [c["finish_reason"] for c in mine][-1] == "length" and sum(c["finish_reason"] is not None for c in mine) == 1
    assert usage["usage"]["completion_tokens"] == sum(len(tokenizer.encode(text)) for text in texts2)
    prompt_chat = usage["usage"]["prompt_tokens"]
    for i, text in enumerate(texts2):  # continuous_usage_stats: in every chunk, its choice's usage so far (vLLM's)
        so_far = [c["usage"] for c in chunks if c["choices"][0]["index"] == i]
        tokens = [u["completion_tokens"] for u in so_far]
        assert tokens == sorted(tokens) and tokens[-1] == len(tokenizer.encode(text))
        assert all(u["prompt_tokens"] == prompt_chat and u["total_tokens"] == prompt_chat + u["completion_tokens"] for u in so_far)
    assert_error(out["too many"], 400, "n must be in [1, 16], got 17", param="n")
    assert_error(out["refused"], 429, "could reserve KV blocks", "resource_exhausted")
    assert {"part-0", "part-1"} <= set(out["aborted"]) and out["holding"] == set()


def test_a_batch_of_prompts_with_n_choices_each_and_echo(tokenizer):
    """prompt=[a, b] with n=2: four requests, ids ID-0 ... ID-3, prompt i's choice j at index
    i * 2 + j; usage counts each prompt once. echo puts the prompt's text (token ids decoded)
    before each of its choices' text, whole or in the first chunk of a stream."""
    outputs = [" one", " two two", " three", " four four"]
    truncated = tokenizer.encode("Hello there")[-1:]

    async def body():
        d, workers = pair()
        async with Servers(tokenizer, workers) as s:
            for rid in ("whole", "stream"):
                d.script.update({f"{rid}-{k}": tokenizer.encode(text) for k, text in enumerate(outputs)})
            whole = await s.client.post("/v1/completions", headers={"x-request-id": "whole"},
                                        json={"prompt": ["Hi", "Hello there"], "n": 2, "echo": True})  # fmt: skip
            stream = await s.client.post("/v1/completions", headers={"x-request-id": "stream"},
                                         json={"prompt": [[5, 6], [7]], "n": 2, "echo": True, "stream": True})  # fmt: skip
            d.script["cut"] = [1000]
            cut = await s.client.post("/v1/completions", headers={"x-request-id": "cut"},
                                      json={"prompt": "Hello there", "echo": True, "truncate_prompt_tokens": 1})  # fmt: skip
        return whole, stream, cut

    whole, stream, cut = asyncio.run(body())
    # truncate_prompt_tokens: the prompt's last tokens, echoed as they decode
    assert cut.json()["choices"][0]["text"] == tokenizer.decode(truncated, skip_special_tokens=False) + tokenizer.decode([1000])
    assert cut.json()["usage"]["prompt_tokens"] == 1
    body = whole.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(k, ["Hi", "Hello there"][k // 2] + text) for k, text in enumerate(outputs)]
    prompt = len(tokenizer.encode("Hi")) + len(tokenizer.encode("Hello there"))
    completion = sum(len(tokenizer.encode(text)) for text in outputs)
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    *chunks, done = events(stream.text)
    echoes = [tokenizer.decode([5, 6], skip_special_tokens=False), tokenizer.decode([7], skip_special_tokens=False)]
    for k, text in enumerate(outputs):
        mine = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == k]
        assert mine[0].startswith(echoes[k // 2]) and "".join(mine) == echoes[k // 2] + text


def test_echo_with_logprobs_and_prompt_logprobs_in_openai_and_vllm_shapes(tokenizer):
    """echo + logprobs (OpenAI's legacy completions, as lm-eval sends them): the prompt's tokens
    lead the choice's logprobs, the first with null; vLLM's prompt_logprobs: per prompt token null
    or {token id: {logprob, rank, decoded_token}}, on the completion's choice and on the chat
    response. The fake prefill worker gives token t the logprob -t / 1000, the most likely but for
    42 (second, after 41): the token's own rank is given beside the top ones."""
    text = lambda t: tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    prompt = [5, 17, 42]

    async def body():
        d, workers = pair()
        async with Servers(tokenizer, workers) as s:
            for rid in ("echo", "stream", "vllm", "chat", "score", "score stream"):
                d.script[rid] = [1000, 1001]
            post = lambda rid, path, **json: s.client.post(path, headers={"x-request-id": rid}, json=json)  # noqa: E731
            return (await post("echo", "/v1/completions", prompt=prompt, echo=True, logprobs=1, max_tokens=2),
                    await post("stream", "/v1/completions", prompt=prompt, echo=True, logprobs=1, max_tokens=2, stream=True),
                    await post("vllm", "/v1/completions", prompt=prompt, prompt_logprobs=0, max_tokens=2),
                    await post("chat", "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], prompt_logprobs=1, max_tokens=2),
                    await post("score", "/v1/completions", prompt=prompt, echo=True, logprobs=1, max_tokens=0),
                    await post("score stream", "/v1/completions", prompt=prompt, echo=True, logprobs=1, max_tokens=0, stream=True,
                               stream_options={"include_usage": True}))  # fmt: skip

    echo, stream, vllm, chat, score, score_stream = asyncio.run(body())
    # echo with max_tokens 0: the prompt scored, nothing generated (OpenAI's legacy API, vLLM)
    (scored,) = score.json()["choices"]
    assert scored["text"] == tokenizer.decode(prompt, skip_special_tokens=False) and scored["finish_reason"] == "length"
    assert scored["logprobs"]["token_logprobs"] == [None, -0.017, -0.042] and score.json()["usage"]["completion_tokens"] == 0
    *streamed, usage, done = events(score_stream.text)
    assert "".join(e["choices"][0]["text"] for e in streamed) == scored["text"] and usage["usage"]["completion_tokens"] == 0
    assert [t for e in streamed for t in e["choices"][0]["logprobs"]["token_logprobs"]] == [None, -0.017, -0.042]
    choice = echo.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tokenizer.decode(prompt, skip_special_tokens=False) + tokenizer.decode([1000, 1001])
    assert lp["tokens"][:3] == [text(t) for t in prompt] and lp["token_logprobs"][:3] == [None, -0.017, -0.042]
    assert lp["top_logprobs"][:3] == [None, {text(17): -0.017}, {text(41): -0.041, text(42): -0.042}]
    assert lp["text_offset"][:4] == [0, len(text(5)), len(text(5)) + len(text(17)), len(text(5)) + len(text(17)) + len(text(42))]
    first = events(stream.text)[0]["choices"][0]
    assert first["logprobs"]["tokens"][:3] == [text(t) for t in prompt] and first["logprobs"]["token_logprobs"][:3] == [None, -0.017, -0.042]
    assert "prompt_logprobs" not in choice  # asked by echo, shown in the logprobs
    assert vllm.json()["choices"][0]["prompt_logprobs"] == [
        None, {"17": {"logprob": -0.017, "rank": 1, "decoded_token": text(17)}},
        {"42": {"logprob": -0.042, "rank": 2, "decoded_token": text(42)}, "41": {"logprob": -0.041, "rank": 1, "decoded_token": text(41)}}]  # fmt: skip
    chat_prompt = tokenizer.encode_chat([{"role": "user", "content": "Hi"}], True, False)
    assert chat.json()["prompt_logprobs"][0] is None and len(chat.json()["prompt_logprobs"]) == len(chat_prompt)
    assert chat.json()["prompt_logprobs"][1] == {str(chat_prompt[1]): {"logprob": -chat_prompt[1] / 1000, "rank": 1,
                                                                          "decoded_token": text(chat_prompt[1])}}  # fmt: skip


def test_special_tokens_stop_strings_and_a_continued_final_message(tokenizer):
    """vLLM's skip_special_tokens (false: the special tokens' text stays), include_stop_str_in_output
    (the text ends after the stop string), and chat's continue_final_message (the prompt ends
    inside the final message: no end of turn, no generation prompt)."""
    end = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert len(end) == 1  # one special token
    words = tokenizer.encode(" one two three four")
    partial = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "Sure: one"}]

    async def body():
        d, workers = pair()
        async with Servers(tokenizer, workers) as s:
            for rid in ("skip", "keep", "cut", "include", "stream"):
                d.script[rid] = words + end + words
            post = s.client.post
            out = {rid: await post("/v1/completions", headers={"x-request-id": rid}, json={"prompt": "Hi", "max_tokens": 20, **extra})
                   for rid, extra in (("skip", {}), ("keep", {"skip_special_tokens": False}), ("cut", {"stop": " three"}),
                                      ("include", {"stop": [" three", "four"], "include_stop_str_in_output": True}),
                                      ("stream", {"stop": "four", "stream": True}))}  # fmt: skip
            out["tokens"] = await post("/tokenize", json={"messages": partial, "add_generation_prompt": False, "continue_final_message": True})
            return out

    out = asyncio.run(body())
    text = {rid: out[rid].json()["choices"][0]["text"] for rid in ("skip", "keep", "cut", "include")}
    assert text["skip"] == " one two three four one two three four"
    assert text["keep"] == " one two three four<|im_end|> one two three four"
    assert (text["cut"], text["include"]) == (" one two", " one two three")
    assert out["cut"].json()["choices"][0]["finish_reason"] == "stop"
    # vLLM's stop_reason: the stop string that ended the choice, the earliest in the text (a stop token id's: test_openai_api)
    assert [out[rid].json()["choices"][0]["stop_reason"] for rid in ("skip", "cut", "include")] == [None, " three", " three"]
    *streamed, done = events(out["stream"].text)
    assert [c["choices"][0]["stop_reason"] for c in streamed] == [None] * (len(streamed) - 1) + ["four"]
    continued = tokenizer.render_chat(partial, add_generation_prompt=False, continue_final_message=True)
    assert continued.endswith("<|im_start|>assistant\nSure: one") and continued in tokenizer.render_chat(partial, False)
    assert out["tokens"].json()["tokens"] == tokenizer.encode(continued, add_special_tokens=False)


def test_every_error_gets_its_status_and_openai_shape(tokenizer):
    async def body():
        out = {}
        async with Servers(tokenizer, []) as s:  # no workers
            out["unavailable"] = await s.client.post("/v1/chat/completions", json=CHAT)
            out["health down"] = await s.client.get("/health")
        d = FakeDecode(refuse=True)
        async with Servers(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))], admission_timeout=0.3) as s:
            out["exhausted"] = await s.client.post("/v1/chat/completions", json=CHAT)
            out["exhausted stream"] = await s.client.post("/v1/completions", json={"prompt": "Hi", "stream": True})
        d = FakeDecode()
        async with Servers(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d, fail=True))]) as s:
            out["prefill failed stream"] = await s.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        refused = RuntimeError("the worker refused it")
        refused.cause = ValueError("prompt is empty")  # as Ray's RayTaskError carries the worker's exception
        d = FakeDecode()
        async with Servers(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d, fail=refused))]) as s:
            out["prefill refused"] = await s.client.post("/v1/chat/completions", json=CHAT)
        d, workers = pair()
        async with Servers(tokenizer, workers) as s:
            post = s.client.post
            out["health"], out["version"] = await s.client.get("/health"), await s.client.get("/version")
            out["max_tokens"] = await post("/v1/chat/completions", json={**CHAT, "max_tokens": 0})
            out["too long"] = await post("/v1/completions", json={"prompt": list(range(10, 300))})
            out["n"] = await post("/v1/chat/completions", json={**CHAT, "n": 0})
            out["penalty"] = await post("/v1/completions", json={"prompt": "Hi", "presence_penalty": 2.5})
            out["repetition"] = await post("/v1/completions", json={"prompt": "Hi", "repetition_penalty": 0})
            out["guided"] = await post("/v1/completions", json={"prompt": "Hi", "guided_json": {"type": "object"}})
            out["json format"] = await post("/v1/completions", json={"prompt": "Hi", "response_format": {"type": "json_object"}})
            out["logit_bias"] = await post("/v1/chat/completions", content=json.dumps({**CHAT, "logit_bias": {"5": float("nan")}}),
                                           headers={"content-type": "application/json"})  # fmt: skip
            out["logit_bias id"] = await post("/v1/chat/completions", json={**CHAT, "logit_bias": {"999999": 1}})
            out["top_logprobs"] = await post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 21})
            out["top without logprobs"] = await post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2})
            out["no messages"] = await post("/v1/chat/completions", json={"max_tokens": 3})
            out["bad json"] = await post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
            out["image"] = await post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
            out["batch too big"] = await post("/v1/completions", json={"prompt": ["a"] * 20, "n": 13})
            out["batch bad prompt"] = await post("/v1/completions", json={"prompt": [[5, 6], []]})
            out["prompt_logprobs"] = await post("/v1/completions", json={"prompt": "Hi", "prompt_logprobs": 21})
            out["suffix"] = await post("/v1/completions", json={"prompt": "Hi", "suffix": "!"})
            out["bad word"] = await post("/v1/completions", json={"prompt": "Hi", "bad_words": ["ok", " "]})
            out["allowed"] = await post("/v1/completions", json={"prompt": "Hi", "allowed_token_ids": [5, 10**6]})
            out["beam"] = await post("/v1/completions", json={"prompt": "Hi", "use_beam_search": True})
            out["spaces"] = await post("/v1/completions", json={"prompt": "Hi", "spaces_between_special_tokens": False})
            out["defaults"] = await post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "skip_special_tokens": True,
                                                                  "bad_words": [], "add_generation_prompt": False})  # fmt: skip
            out["continue both"] = await post("/v1/chat/completions", json={**CHAT, "continue_final_message": True})
            out["continue missing"] = await post("/tokenize", json={"messages": [{"role": "user", "content": "  "}],
                                                                   "add_generation_prompt": False, "continue_final_message": True})  # fmt: skip
            out["chat echo"] = await post("/v1/chat/completions", json={**CHAT, "echo": True})
            out["card"] = await s.client.get(f"/v1/models/{MODEL.name}")
            out["no card"] = await s.client.get("/v1/models/gpt-4")
            out["tokenize"] = await post("/tokenize", json={"prompt": "Hello there"})
            out["tokenize chat"] = await post("/tokenize", json={"messages": CHAT["messages"], "model": MODEL.name})
            out["tokenize both"] = await post("/tokenize", json={"prompt": "Hi", "messages": CHAT["messages"]})
            out["detokenize"] = await post("/detokenize", json={"tokens": tokenizer.encode("Hello there")})
            out["detokenize bad"] = await post("/detokenize", json={"tokens": [5, 10**6]})
            out["model"] = await post("/v1/completions", json={"prompt": "Hi", "model": "gpt-4"})
            out["route"] = await s.client.get("/v1/nothing")
            raw = {"content-type": "application/json"}
            for name, path, text in (("surrogate prompt", "/v1/completions", '{"prompt": "hi \\ud800 x"}'),
                                     ("surrogate role", "/v1/chat/completions", '{"messages": [{"role": "\\udfff", "content": "x"}]}'),
                                     ("surrogate model", "/v1/completions", '{"prompt": "hi", "model": "\\ud800"}'),
                                     ("surrogate tokenize", "/tokenize", '{"prompt": "\\ud800"}')):  # fmt: skip
                out[name] = await post(path, content=text.encode(), headers=raw)
            out["emoji"] = await post("/v1/completions", content=b'{"prompt": "hi \\ud83d\\ude00", "max_tokens": 1}', headers=raw)
            out["seed"] = await post("/v1/completions", json={"prompt": "Hi", "seed": 2**64 + 42})
            out["stream_options"] = await post("/v1/completions", json={"prompt": "Hi", "stream_options": {"include_usage": True}})
            out["tool_choice"] = await post("/v1/chat/completions", json={**CHAT, "tool_choice": "required"})
            out["audio"] = await post("/v1/chat/completions", json={**CHAT, "modalities": ["text", "audio"]})
            called = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                              "function": {"name": "f", "arguments": "{}"}}]}  # fmt: skip
            out["tool_calls"] = await post("/v1/chat/completions", json={"messages": [*CHAT["messages"], called]})
            out["tokens too long"] = await post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1000})
            out["text only"] = await post("/v1/chat/completions", json={**CHAT, "modalities": ["text"], "tool_choice": "none"})
            out["truncate"] = await post("/v1/completions", json={"prompt": "Hi", "truncate_prompt_tokens": 100_000})
            # null is the default for every optional field, as OpenAI's schema has it; vLLM's leniencies
            nulls = {"stream": None, "n": None, "stream_options": None, "max_tokens": 1, "min_tokens": None, "ignore_eos": None}
            out["chat nulls"] = await post("/v1/chat/completions", json={**nulls, "logprobs": None, "add_generation_prompt": None,
                                                                         "messages": [{"role": "user", "content": "Hi", "name": None}]})  # fmt: skip
            out["nulls"] = await post("/v1/completions", json={**nulls, "prompt": "Hi", "echo": None})
            out["named"] = await post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "Hi", "name": "ann"}]})
            out["empty stream_options"] = await post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "stream_options": {}})
            out["top 0"] = await post("/v1/chat/completions", json={**CHAT, "top_logprobs": 0})
            out["structural"] = await post("/v1/chat/completions", json={**CHAT, "structural_tag": "{}"})
            out["no model name"] = await post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "model": ""})
            out["template kwargs"] = await post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {"enable_thinking": False}})
            out["template kwargs taken"] = await post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {"messages": []}})
            out["template kwargs prompt"] = await post("/tokenize", json={"prompt": "Hi", "chat_template_kwargs": {"x": 1}})
            out["template kwargs global"] = await post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {"raise_exception": 1}})
            out["template kwargs long"] = await post("/tokenize", json={"messages": CHAT["messages"], "chat_template_kwargs": {"tools": "x" * 400_000}})
            out["union type"] = await post("/v1/completions", json={"prompt": 123})
            out["union item"] = await post("/v1/completions", json={"prompt": [1, "a"]})
            out["dict key"] = await post("/v1/completions", json={"prompt": "Hi", "logit_bias": {"abc": 1}})
            out["preflight"] = await s.client.options("/v1/completions", headers={"origin": "https://example.com",
                                                                                  "access-control-request-method": "POST"})  # fmt: skip
        return out

    out = asyncio.run(body())
    assert_error(out["unavailable"], 503, "no decode worker is ready", "unavailable")
    assert_error(out["health down"], 503, "cannot serve now", "unavailable")
    assert_error(out["exhausted"], 429, "could reserve KV blocks", "resource_exhausted")
    assert_error(out["exhausted stream"], 429, "could reserve KV blocks", "resource_exhausted")
    assert_error(out["prefill failed stream"], 503, "KV channel failed", "unavailable")
    assert_error(out["prefill refused"], 400, "prefill on p refused the request")  # not retried: a 503 would make clients retry
    assert out["health"].status_code == 200 and out["version"].json() == {"version": "0.1.0"}
    assert_error(out["max_tokens"], 400, "max_tokens must be >= 1", param="max_tokens")
    assert_error(out["too long"], 400, "This model's maximum context length is 256 tokens.", "context_length_exceeded", "prompt")
    assert_error(out["n"], 400, "n must be in [1, 16], got 0", param="n")
    assert_error(out["penalty"], 400, "presence_penalty must be in [-2, 2], got 2.5", param="presence_penalty")
    assert_error(out["repetition"], 400, "repetition_penalty must be > 0, got 0", param="repetition_penalty")
    assert_error(out["guided"], 400, "guided_json is not supported", param="guided_json")
    assert_error(out["json format"], 400, "only the text response_format", param="response_format")
    assert_error(out["logit_bias"], 400, "logit_bias", param="logit_bias")
    assert_error(out["logit_bias id"], 400, "logit_bias token id 999999 is outside the vocabulary", param="logit_bias")
    assert_error(out["top_logprobs"], 400, "less than or equal to 20", param="top_logprobs")
    assert_error(out["top without logprobs"], 400, "needs logprobs set to true", param="top_logprobs")
    assert_error(out["no messages"], 400, "messages: Field required", param="messages")
    assert_error(out["bad json"], 400, "the request body is not valid JSON")
    assert out["bad json"].json()["error"]["param"] is None
    assert_error(out["image"], 400, "only text content parts", param="messages")
    assert_error(out["batch too big"], 400, "20 prompts x n=13 is more than 256 requests", param="prompt")
    assert_error(out["batch bad prompt"], 400, "prompt 1: token_ids is empty", param="prompt")
    assert_error(out["prompt_logprobs"], 400, "less than or equal to 20", param="prompt_logprobs")
    assert_error(out["suffix"], 400, "suffix is not supported", param="suffix")
    assert_error(out["bad word"], 400, "bad_words must be non-blank strings", param="bad_words")
    assert_error(out["allowed"], 400, "allowed token id 1000000 is outside the vocabulary", param="allowed_token_ids")
    assert_error(out["beam"], 400, "use_beam_search=true is not supported", param="use_beam_search")
    assert_error(out["spaces"], 400, "spaces_between_special_tokens=false is not supported", param="spaces_between_special_tokens")
    assert out["defaults"].status_code == 200  # the values that change nothing; add_generation_prompt is chat's alone
    assert_error(out["continue both"], 400, "continue_final_message and add_generation_prompt cannot both be set", param="messages")
    assert_error(out["continue missing"], 400, "the final message's content is not in the rendered chat", param="messages")
    assert_error(out["chat echo"], 400, "echo=true is not supported", param="echo")
    assert out["card"].json()["id"] == MODEL.name and out["card"].json()["max_model_len"] == MODEL.max_model_len
    assert_error(out["no card"], 404, "`gpt-4` does not exist", "not_found", "model")
    ids = tokenizer.encode("Hello there")
    assert out["tokenize"].json() == {"count": len(ids), "max_model_len": MODEL.max_model_len, "tokens": ids}
    assert out["tokenize chat"].json()["tokens"] == tokenizer.encode_chat(CHAT["messages"])
    assert_error(out["tokenize both"], 400, "more than one input (prompt, messages)")
    assert out["detokenize"].json() == {"prompt": "Hello there"}
    assert_error(out["detokenize bad"], 400, "token id 1000000 is outside the vocabulary", param="tokens")
    assert_error(out["model"], 404, "`gpt-4` does not exist", "not_found", "model")
    assert_error(out["route"], 404, "Not Found", "not_found")
    assert out["too long"].json()["error"]["type"] == "invalid_request_error"
    for name in ("surrogate prompt", "surrogate role", "surrogate model", "surrogate tokenize"):
        assert_error(out[name], 400, "a string holds a lone UTF-16 surrogate")
    assert out["emoji"].status_code == 200  # a surrogate pair is one character, as JSON spells it
    assert_error(out["seed"], 400, "less than or equal to 9223372036854775807", param="seed")
    assert_error(out["stream_options"], 400, "stream_options is only for stream=true", param="stream_options")
    assert_error(out["tool_choice"], 400, "tool_choice needs tools", param="tool_choice")
    assert_error(out["audio"], 400, 'modalities=["text", "audio"] is not supported', param="modalities")
    assert_error(out["tool_calls"], 400, "messages with tool_calls are not supported", param="messages")
    assert_error(out["tokens too long"], 400, "max_tokens can be at most 255", "context_length_exceeded", "max_tokens")
    assert out["text only"].status_code == 200
    assert_error(out["truncate"], 400, "truncate_prompt_tokens 100000 is more than the model's maximum length 256", param="truncate_prompt_tokens")
    for name in ("chat nulls", "nulls", "named", "empty stream_options", "top 0"):
        assert out[name].status_code == 200, (name, out[name].text)
    assert_error(out["structural"], 400, "structural_tag is not supported", param="structural_tag")
    assert out["no model name"].status_code == 200  # as vLLM's: the served model
    assert out["template kwargs"].status_code == 200  # the template's other variables (SmolLM's has none such)
    assert_error(out["template kwargs taken"], 400, "chat_template_kwargs cannot set messages", param="messages")
    assert_error(out["template kwargs prompt"], 400, "chat_template_kwargs apply to messages only")
    assert_error(out["template kwargs global"], 400, "chat_template_kwargs cannot set raise_exception", param="messages")
    assert_error(out["template kwargs long"], 400, "This model's maximum context length is 256 tokens", "context_length_exceeded", "messages")
    # param names the body's field, not pydantic's union branch ("prompt.str") or key marker
    assert_error(out["union type"], 400, "prompt: Input should be a valid string", param="prompt")
    assert_error(out["union item"], 400, "prompt.1: Input should be a valid integer", param="prompt")
    assert_error(out["dict key"], 400, "logit_bias.abc: Input should be a valid integer", param="logit_bias")
    assert "access-control-allow-origin" not in out["preflight"].headers  # no CORS unless --allowed-origins


def test_allowed_origins_answer_a_browsers_preflight(tokenizer):
    async def body():
        s = Servers(tokenizer, [])
        s.http = HttpServer(s.router, MODEL, Auth(), allowed_origins=("https://ui.example",))
        async with s:
            preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}
            allowed = await s.client.options("/v1/chat/completions", headers={"origin": "https://ui.example", **preflight})
            other = await s.client.options("/v1/chat/completions", headers={"origin": "https://evil.example", **preflight})
        return allowed, other

    allowed, other = asyncio.run(body())
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://ui.example"
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_an_unexpected_error_is_a_500_in_openai_shape(tokenizer, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    async def body():
        d, workers = pair()
        async with Servers(tokenizer, workers) as s:
            return [await s.client.post("/v1/completions", json={"prompt": "Hi", "stream": stream}) for stream in (False, True)]

    monkeypatch.setattr(http_server, "validate", broken)
    for response in asyncio.run(body()):
        assert_error(response, 500, "internal error (RuntimeError)", "internal_error")


def test_a_body_too_large_is_refused_before_it_is_parsed(tokenizer, monkeypatch):
    """By its Content-Length, or sent in chunks, once they pass the limit; a 413 in OpenAI's shape."""

    async def chunks():
        for _ in range(5):
            yield b'{"prompt": "' + b"x" * 500

    async def body():
        d, workers = pair()
        async with Servers(tokenizer, workers) as s:
            sized = await s.client.post("/v1/completions", json={"prompt": "x" * 2000})
            chunked = await s.client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
            fits = await s.client.post("/v1/completions", json={"prompt": "x" * 900, "max_tokens": 1})
        return sized, chunked, fits

    monkeypatch.setattr(http_server, "MAX_BODY_BYTES", 1000)
    sized, chunked, fits = asyncio.run(body())
    assert_error(sized, 413, "the request body is over 1000 bytes")
    assert_error(chunked, 413, "the request body is over 1000 bytes")
    assert fits.status_code == 200


def test_a_failure_after_the_first_token_ends_the_stream_with_an_error_event(tokenizer):
    async def body():
        d = FakeDecode(die_after_steps=3)
        d.script["dies"] = [1000, 1001, 1002, 1003, 1004, 1005]
        # No migration: the worker's death is the request's end (with moves on, it would wait for another).
        async with Servers(tokenizer, [("d", Role.DECODE, d), ("p", Role.PREFILL, FakePrefill(d))], migration_limit=0) as s:
            return await s.client.post("/v1/completions", headers={"x-request-id": "dies"}, json={"prompt": [5], "stream": True})

    response = asyncio.run(body())
    assert response.status_code == 200
    *tokens, error, done = events(response.text)
    assert tokens and all(t["choices"][0]["text"] is not None for t in tokens) and done == "[DONE]"
    assert error["error"]["code"] == "unavailable" and "died" in error["error"]["message"]


def test_a_client_that_disconnects_aborts_its_request(tokenizer):
    async def body():
        d, workers = pair()
        d.script["long"] = list(range(1000, 1200))
        async with Servers(tokenizer, workers) as s:
            async with s.client.stream("POST", "/v1/completions", headers={"x-request-id": "long"},
                                       json={"prompt": [5], "max_tokens": 200, "stream": True}) as response:  # fmt: skip
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break  # and leave: the connection closes
            await asyncio.sleep(0.3)
            streaming = (d.aborted[:], dict(s.router.requests))
            d.script["whole"] = list(range(1000, 1200))
            with pytest.raises(httpx.ReadTimeout):
                await s.client.post("/v1/completions", headers={"x-request-id": "whole"}, json={"prompt": [5], "max_tokens": 200},
                                    timeout=0.5)  # fmt: skip
            await asyncio.sleep(0.3)
            return streaming, (d.aborted[:], dict(s.router.requests))

    (aborted, live), (aborted_after, live_after) = asyncio.run(body())
    assert aborted == ["long"] and not live
    assert aborted_after == ["long", "whole"] and not live_after


def test_api_keys_on_both_front_ends(tokenizer):
    async def scale(sizes, bounds):
        pass

    async def body():
        d, workers = pair()
        d.script["mine"] = list(range(1000, 1100))
        async with Servers(tokenizer, workers, auth=KEYS, scale=scale) as s:
            http = {}
            for name, headers in (("none", {}), ("wrong", {"Authorization": "Bearer nope"}), ("basic", {"Authorization": "Basic alice-key"}),
                                  ("alice", {"Authorization": "Bearer alice-key"}), ("admin", {"Authorization": "bearer admin-key"})):  # fmt: skip
                http[name] = (await s.client.post("/v1/completions", json={"prompt": [5], "max_tokens": 2}, headers=headers),
                              await s.client.get("/v1/models", headers=headers))  # fmt: skip
            http["open"] = (await s.client.get("/health"), await s.client.get("/version"))
            # A body that is not JSON: 401 without a key (the key is checked first), 400 with one.
            http["bad json"] = [await s.client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json", **key})
                                for key in ({}, {"Authorization": "Bearer alice-key"})]  # fmt: skip

            stub, admin = pb_grpc.GenerationStub(s.channel), pb_grpc.AdminStub(s.channel)
            alice, bob, root = ((("authorization", f"Bearer {key}"),) for key in ("alice-key", "bob-key", "admin-key"))
            codes = {}
            for name, call in (("generate", lambda md: stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5])), metadata=md).read()),
                               ("info", lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md)),
                               ("abort", lambda md: stub.Abort(pb.AbortRequest(request_id="x"), metadata=md)),
                               ("scale", lambda md: admin.Scale(pb.ScaleRequest(prefill=1), metadata=md))):  # fmt: skip
                for who, md in (("none", ()), ("wrong", (("authorization", "Bearer nope"),)), ("alice", (("authorization", "Bearer alice-key"),))):
                    try:
                        await call(md)
                        codes[name, who] = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as e:
                        codes[name, who] = e.code()
            health = await health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(service=""))

            stream = stub.Generate(pb.GenerateRequest(request_id="mine", token_ids=pb.TokenIds(ids=[5])), metadata=alice)
            await stream.read()
            by_bob = await stub.Abort(pb.AbortRequest(request_id="mine"), metadata=bob)
            await stream.read()  # still streaming
            by_alice = await stub.Abort(pb.AbortRequest(request_id="mine"), metadata=alice)
            while (response := await stream.read()) != grpc.aio.EOF:
                last = response
            scaled = await admin.Scale(pb.ScaleRequest(prefill=1), metadata=root)
        return http, codes, health, by_bob, by_alice, last, scaled

    http, codes, health, by_bob, by_alice, last, scaled = asyncio.run(body())
    for who in ("none", "wrong", "basic"):
        for response in http[who]:
            assert_error(response, 401, "a valid API key is required", "invalid_api_key")
    assert [r.status_code for r in http["alice"] + http["admin"] + http["open"]] == [200] * 6
    assert [r.status_code for r in http["bad json"]] == [401, 400]
    U, OK = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK
    for name in ("generate", "info", "abort", "scale"):
        assert codes[name, "none"] == codes[name, "wrong"] == U, name
    assert codes["generate", "alice"] == codes["info", "alice"] == codes["abort", "alice"] == OK
    assert codes["scale", "alice"] == grpc.StatusCode.PERMISSION_DENIED
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert not by_bob.found and by_alice.found and last.finish_reason == "abort"
    assert scaled.mode == "disaggregated"


def test_a_checkout_that_was_never_installed_still_serves_and_says_so(monkeypatch):
    """Run from a source tree on PYTHONPATH (as on a lent GPU machine), pdserve has no package
    metadata: the version the app is built with (and /version) says so instead of failing the start."""
    import importlib.metadata

    from router import http_server

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert http_server._version() == "unknown (not installed)"

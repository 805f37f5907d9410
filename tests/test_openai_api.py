"""A 1 prefill + 1 decode cluster with the default model, API keys and TLS on, through its OpenAI
HTTP API with the official `openai` package and through gRPC: the same greedy text as
LLM.generate, logprobs equal to transformers' log-softmax, usage, errors, a disconnect that frees
every block, `bench serve` against both ports, keys that scope Abort, bounded Scale, TLS."""

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest
from gpus import placement
from oracle import ORACLE_DTYPE, assert_logprobs_match, assert_rank_matches, hf_logprobs
from tls import make_ca_and_server_cert

from cluster import client
from cluster.cluster import Cluster
from cluster.config import ServeConfig
from engine import SamplingParams
from engine.config import EngineConfig
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

MODEL = "SmolLM2-135M-Instruct"
ALICE, BOB, ADMIN = "alice-key", "bob-key", "admin-key"
CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
RAW = ["The quick brown fox", "def fibonacci(n):\n    ", "Paris is the capital of France. Berlin is the capital of"]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_ca_and_server_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def cluster(ray_local, tls):
    config = ServeConfig(engine=EngineConfig(kv_cache_gb=0.25, max_model_len=2048, dtype=ORACLE_DTYPE), prefill=1, decode=1, port=0, http_port=0, **placement(4),
                         api_keys=(ALICE, BOB), admin_keys=(ADMIN,), tls_cert=tls["cert"], tls_key=tls["key"],
                         max_prefill=2, max_decode=2)  # fmt: skip
    cluster = Cluster(config).start()
    yield cluster
    cluster.stop()


def sdk(cluster, tls, key=ALICE) -> openai.OpenAI:
    verify = ssl.create_default_context(cafile=tls["ca"])
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=key, max_retries=0, http_client=openai.DefaultHttpxClient(verify=verify))


def http(cluster, tls) -> httpx.Client:
    return httpx.Client(base_url=cluster.base_url, verify=ssl.create_default_context(cafile=tls["ca"]), timeout=120)


def bearer(key):
    return client.metadata(key)


def kv_in_use(cluster, tls) -> list[int]:
    with client.channel(cluster.target, tls["ca"]) as channel:
        state = pb_grpc.GenerationStub(channel).GetClusterState(pb.GetClusterStateRequest(), timeout=30, metadata=bearer(ALICE))
    return [w.kv_blocks.in_use + w.running + w.waiting for w in state.workers]


def wait_all_free(cluster, tls, timeout=60):
    deadline = time.monotonic() + timeout
    while any(kv_in_use(cluster, tls)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(kv_in_use(cluster, tls)), kv_in_use(cluster, tls)


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n)


def test_chat_and_completions_streamed_and_whole_match_llm_generate(cluster, tls, default_llm):
    api = sdk(cluster, tls)
    for i, question in enumerate(CHATS):
        messages = [{"role": "user", "content": question}]
        prompt_ids = default_llm.apply_chat_template(messages)
        ref = default_llm.generate(prompt_ids, greedy(12 + 4 * i))[0]
        whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12 + 4 * i, temperature=0)
        assert whole.choices[0].message.content == ref.text and whole.choices[0].finish_reason == ref.finish_reason
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids), len(ref.token_ids))
        chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12 + 4 * i, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
        assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and chunks[-1].usage.total_tokens == len(prompt_ids) + len(ref.token_ids)
    for i, text in enumerate(RAW):
        prompt_ids = default_llm.tokenizer.encode(text)
        ref = default_llm.generate(prompt_ids, greedy(10 + 3 * i))[0]
        whole = api.completions.create(model=MODEL, prompt=text, max_tokens=10 + 3 * i, temperature=0)
        assert whole.choices[0].text == ref.text and whole.choices[0].finish_reason == ref.finish_reason
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids), len(ref.token_ids))
        streamed = list(api.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=10 + 3 * i, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == ref.text and streamed[-1].choices[0].finish_reason == ref.finish_reason
    # Penalties, OpenAI's two and vLLM's repetition_penalty (the SDK sends that one in extra_body).
    messages = [{"role": "user", "content": CHATS[0]}]
    penalties = dict(presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.3)
    ref = default_llm.generate(default_llm.apply_chat_template(messages), SamplingParams(temperature=0, max_tokens=24, **penalties))[0]
    assert ref.text != default_llm.generate(default_llm.apply_chat_template(messages), greedy(24))[0].text
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, presence_penalty=0.6,
                                        frequency_penalty=0.4, extra_body={"repetition_penalty": 1.3})  # fmt: skip
    assert whole.choices[0].message.content == ref.text
    forced = api.completions.create(model=MODEL, prompt=RAW[0], max_tokens=4, temperature=0, logit_bias={"1000": 100})
    assert forced.choices[0].text == default_llm.tokenizer.decode([1000] * 4)
    # vLLM's continue_final_message: the reply continues the assistant's message.
    partial = [{"role": "user", "content": CHATS[2]}, {"role": "assistant", "content": "Sure! The first is"}]
    ref = default_llm.chat(partial, greedy(8), add_generation_prompt=False, continue_final_message=True)[0]
    whole = api.chat.completions.create(model=MODEL, messages=partial, max_tokens=8, temperature=0,
                                        extra_body={"add_generation_prompt": False, "continue_final_message": True})  # fmt: skip
    assert whole.choices[0].message.content == ref.text
    # vLLM's allowed_token_ids: the greedy choice among them.
    allowed = default_llm.tokenizer.encode(" yes no maybe")
    ref = default_llm.generate(default_llm.tokenizer.encode(RAW[2]), SamplingParams(temperature=0, max_tokens=3, allowed_token_ids=allowed))[0]
    whole = api.completions.create(model=MODEL, prompt=RAW[2], max_tokens=3, temperature=0, extra_body={"allowed_token_ids": allowed})
    assert whole.choices[0].text == ref.text and set(ref.token_ids) <= set(allowed)
    # vLLM's bad_words: a word plain greedy writes, banned.
    plain = default_llm.generate(default_llm.tokenizer.encode(RAW[2]), greedy(6))[0].text
    word = plain.split()[0]
    ref = default_llm.generate(default_llm.tokenizer.encode(RAW[2]), SamplingParams(temperature=0, max_tokens=6, bad_words=[word]))[0]
    whole = api.completions.create(model=MODEL, prompt=RAW[2], max_tokens=6, temperature=0, extra_body={"bad_words": [word]})
    assert whole.choices[0].text == ref.text and word not in ref.text.split()
    # vLLM's stop_token_ids, and its stop_reason: the token id that ended the choice.
    plain_ids = default_llm.generate(default_llm.tokenizer.encode(RAW[1]), greedy(8))[0].token_ids
    stop_id = next(t for i, t in enumerate(plain_ids) if i > 0 and t not in plain_ids[:i])
    whole = api.completions.create(model=MODEL, prompt=RAW[1], max_tokens=8, temperature=0, extra_body={"stop_token_ids": [stop_id]})
    assert (whole.choices[0].finish_reason, whole.choices[0].stop_reason) == ("stop", stop_id)
    assert whole.choices[0].text == default_llm.tokenizer.decode(plain_ids[: plain_ids.index(stop_id)])  # the stop token's text is not output
    wait_all_free(cluster, tls)


def test_n_choices_are_the_seeded_requests_they_stand_for(cluster, tls, default_llm):
    """n=3 with seed s: choice i is what LLM.generate gives with seed s + i, whole and streamed;
    usage counts the prompt once."""
    api = sdk(cluster, tls)
    prompt_ids = default_llm.tokenizer.encode(RAW[1])
    refs = [default_llm.generate(prompt_ids, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=7 + i))[0] for i in range(3)]
    assert len({r.text for r in refs}) > 1  # the seeds give different choices
    whole = api.completions.create(model=MODEL, prompt=RAW[1], max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=3)
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == [r.text for r in refs]
    assert whole.usage.prompt_tokens == len(prompt_ids) and whole.usage.completion_tokens == sum(len(r.token_ids) for r in refs)
    chunks = list(api.completions.create(model=MODEL, prompt=RAW[1], max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=3, stream=True))
    assert ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)] == [r.text for r in refs]
    wait_all_free(cluster, tls)


def test_a_batch_of_prompts_is_a_request_per_prompt_and_choice(cluster, tls, default_llm):
    """prompt=[a, b] with n=2 and seed s: choice i * 2 + j is what LLM.generate gives prompt i with
    seed s + j, as text or token ids, whole and streamed; echo puts each prompt before its choices."""
    api = sdk(cluster, tls)
    ids = [default_llm.tokenizer.encode(text) for text in RAW[:2]]
    refs = [default_llm.generate(p, SamplingParams(temperature=1.0, max_tokens=8, seed=3 + j))[0].text for p in ids for j in range(2)]
    whole = api.completions.create(model=MODEL, prompt=RAW[:2], max_tokens=8, temperature=1.0, seed=3, n=2, echo=True)
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == [RAW[k // 2] + ref for k, ref in enumerate(refs)]
    assert whole.usage.prompt_tokens == sum(map(len, ids))
    chunks = list(api.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=1.0, seed=3, n=2, stream=True))
    assert ["".join(c.choices[0].text for c in chunks if c.choices[0].index == k) for k in range(4)] == refs
    wait_all_free(cluster, tls)


def test_logprobs_match_transformers_through_http_and_grpc(cluster, tls, default_llm, hf_default_model):
    """The first token's logprobs come from the prefill worker, the rest from the decode worker."""
    api = sdk(cluster, tls)
    messages = [{"role": "user", "content": CHATS[1]}]
    prompt_ids = default_llm.apply_chat_template(messages)
    ids_of = lambda entries: [int(e.token.removeprefix("token_id:")) for e in entries]  # noqa: E731

    whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=5,
                                        extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs.content  # fmt: skip
    out = ids_of(whole)
    assert out == default_llm.generate(prompt_ids, greedy(10))[0].token_ids
    assert_logprobs_match(hf_logprobs(hf_default_model, prompt_ids, out), out,
                          [(e.logprob, list(zip(ids_of(e.top_logprobs), [t.logprob for t in e.top_logprobs]))) for e in whole], 5)

    stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2,
                                         stream=True)  # fmt: skip
    entries = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [default_llm.tokenizer.decode([t], skip_special_tokens=False) for t in out]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in whole], abs=1e-6)
    assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in entries)

    text_ids = default_llm.tokenizer.encode(RAW[2])
    completion = api.completions.create(model=MODEL, prompt=RAW[2], max_tokens=6, temperature=0, logprobs=3).choices[0].logprobs
    ref = default_llm.generate(text_ids, greedy(6))[0].token_ids
    expected = hf_logprobs(hf_default_model, text_ids, ref)
    assert completion.tokens == [default_llm.tokenizer.decode([t], skip_special_tokens=False) for t in ref]
    assert completion.token_logprobs == pytest.approx([expected[i, t].item() for i, t in enumerate(ref)], abs=1e-4)
    assert all(3 <= len(top) <= 4 for top in completion.top_logprobs) and completion.text_offset[0] == 0

    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=text_ids), sampling=pb.SamplingParams(temperature=0, max_tokens=6, logprobs=4))
    with client.channel(cluster.target, tls["ca"]) as channel:
        responses = list(pb_grpc.GenerationStub(channel).Generate(request, timeout=120, metadata=bearer(ALICE)))
    tokens = [t for r in responses for t in r.token_ids]
    logprobs = [(lp.logprob, [(t.token_id, t.logprob) for t in lp.top], lp.rank) for r in responses for lp in r.logprobs]
    assert tokens == ref
    assert_logprobs_match(expected, tokens, logprobs, 4)


def test_echo_with_logprobs_gives_the_prompts_logprobs_of_transformers(cluster, tls, default_llm, hf_default_model):
    """What lm-eval's loglikelihood sends: echo, logprobs and one new token. The prompt's tokens
    lead the logprobs, each with its logprob given the tokens before it (the first: null), equal
    to transformers' log-softmax; vLLM's prompt_logprobs field says the same."""
    import torch

    api = sdk(cluster, tls)
    ids = default_llm.tokenizer.encode(RAW[2])
    with torch.no_grad():
        expected = hf_default_model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    choice = api.completions.create(model=MODEL, prompt=RAW[2], max_tokens=1, temperature=0, logprobs=2, echo=True).choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(RAW[2]) and lp.tokens[: len(ids)] == [default_llm.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx([expected[i, t].item() for i, t in enumerate(ids[1:])], abs=1e-4)
    vllm = api.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}).choices[0]
    entries = vllm.model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for i, (token, entry) in enumerate(zip(ids[1:], entries[1:])):
        assert entry[str(token)]["logprob"] == pytest.approx(expected[i, token].item(), abs=1e-4)
        top = expected[i].topk(2).indices.tolist()
        assert [int(t) for t, e in entry.items() if int(t) != token or token in top] == top
        assert_rank_matches(expected[i], token, entry[str(token)]["rank"])


def assert_openai_error(response: httpx.Response, status: int, message: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"]
    return error


def test_errors_through_the_sdk_and_raw_http(cluster, tls):
    api = sdk(cluster, tls)
    with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
        api.completions.create(model=MODEL, prompt="Hi", max_tokens=5000)
    assert e.value.code == "context_length_exceeded"  # what clients look for to shorten a conversation
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.AuthenticationError):
        sdk(cluster, tls, key="wrong").models.list()
    with http(cluster, tls) as h:
        assert_openai_error(h.post("/v1/chat/completions", json={"messages": []}), 401, "API key")
        auth = {"Authorization": f"Bearer {BOB}"}
        error = assert_openai_error(h.post("/v1/chat/completions", json={"messages": [], "max_tokens": 3}, headers=auth), 400, "messages is empty")
        assert error["type"] == "invalid_request_error"
        assert_openai_error(h.post("/v1/completions", json={"prompt": [1, 49152]}, headers=auth), 400, "outside the vocabulary")
        assert h.get("/health").status_code == 200 and h.get("/version").json()["version"]
        assert h.get("/v1/models", headers=auth).json()["data"][0]["id"] == MODEL
    wait_all_free(cluster, tls)


@pytest.mark.parametrize("n", [1, 3])
def test_a_disconnect_mid_stream_leaves_no_block_in_use(cluster, tls, n):
    """n=3: closing the request ends all three of its engine requests."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1500,
            "ignore_eos": True, "stream": True, "n": n}  # fmt: skip
    auth = {"Authorization": f"Bearer {ALICE}"}
    with http(cluster, tls) as h:
        with h.stream("POST", "/v1/chat/completions", json=body, headers=auth) as response:
            received = 0
            for line in response.iter_lines():
                received += line.startswith("data: ")
                if received == 5:
                    assert max(kv_in_use(cluster, tls)) > 0  # it is decoding
                    break
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
            h.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "n": n}, headers=auth,
                   timeout=3)  # fmt: skip
    wait_all_free(cluster, tls)


def test_bench_serve_writes_the_same_fields_against_http_and_grpc(cluster, tls, tmp_path):
    from benchmarks import serve

    common = ["--dataset-name", "random", "--num-prompts", "4", "--random-input-len", "24", "--random-output-len", "8",
              "--max-concurrency", "2", "--ignore-eos", "--api-key", ALICE, "--tls-ca", tls["ca"], "--save-result",
              "--save-detailed", "--disable-tqdm", "--goodput", "ttft:60000"]  # fmt: skip
    openai_result = serve.main(["--backend", "openai-chat", "--base-url", cluster.base_url, "--model", MODEL,
                                "--result-filename", str(tmp_path / "http.json"), *common])  # fmt: skip
    grpc_result = serve.main(["--backend", "grpc", "--target", cluster.target, "--result-filename", str(tmp_path / "grpc.json"), *common])
    saved = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("http", "grpc")}
    assert set(saved["http"]) == set(saved["grpc"]) and {"mean_ttft_ms", "p99_itl_ms", "request_goodput", "ttfts"} <= set(saved["http"])
    for result, backend in ((openai_result, "openai-chat"), (grpc_result, "grpc")):
        assert result["completed"] == 4 and result["failed"] == 0 and result["total_output_tokens"] == 32
        assert result["backend"] == backend
    assert saved["http"]["output_lens"] == [8] * 4 and saved["http"]["model_id"] == MODEL
    # vllm bench's own spelling of the same run (completions API, host and port)
    vllm_style = serve.main(["--backend", "vllm", "--host", "127.0.0.1", "--port", str(cluster.http_port), "--endpoint", "/v1/completions",
                             "--dataset-name", "random", "--num-prompts", "2", "--random-input-len", "16", "--random-output-len", "4",
                             "--ignore-eos", "--api-key", ALICE, "--tls-ca", tls["ca"], "--disable-tqdm", "--trust-remote-code",
                             "--metric-percentiles", "50,99", "--percentile-metrics", "ttft,itl"])  # fmt: skip
    assert vllm_style["completed"] == 2 and "p50_itl_ms" in vllm_style and "p99_tpot_ms" not in vllm_style
    wait_all_free(cluster, tls)


def test_keys_scope_abort_and_guard_scale_and_the_cli(cluster, tls):
    async def body():
        async with client.aio_channel(cluster.target, tls["ca"]) as channel:
            stub, admin = pb_grpc.GenerationStub(channel), pb_grpc.AdminStub(channel)
            long = pb.GenerateRequest(request_id="alices", prompt="Tell me a story.", sampling=pb.SamplingParams(max_tokens=1000, ignore_eos=True))
            with pytest.raises(grpc.aio.AioRpcError) as no_key:
                await stub.Generate(long).read()
            stream = stub.Generate(long, metadata=bearer(ALICE), timeout=300)
            await stream.read()
            by_bob = await stub.Abort(pb.AbortRequest(request_id="alices"), metadata=bearer(BOB))
            await stream.read()  # still running
            by_alice = await stub.Abort(pb.AbortRequest(request_id="alices"), metadata=bearer(ALICE))
            while (response := await stream.read()) != grpc.aio.EOF:
                last = response
            codes = {}
            for name, key, sizes in (("user", ALICE, dict(prefill=1)), ("beyond", ADMIN, dict(prefill=3)),
                                     ("billions", ADMIN, dict(decode=4_000_000_000))):  # fmt: skip
                try:
                    await admin.Scale(pb.ScaleRequest(**sizes), metadata=bearer(key), timeout=60)
                    codes[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    codes[name] = (e.code(), e.details())
            return no_key.value.code(), by_bob.found, by_alice.found, last.finish_reason, codes

    no_key, by_bob, by_alice, finish, codes = asyncio.run(body())
    assert no_key == grpc.StatusCode.UNAUTHENTICATED
    assert (by_bob, by_alice, finish) == (False, True, "abort")
    assert codes["user"][0] == grpc.StatusCode.PERMISSION_DENIED
    assert codes["beyond"][0] == codes["billions"][0] == grpc.StatusCode.INVALID_ARGUMENT and "--max-prefill" in codes["beyond"][1]
    cli = [sys.executable, "-m", "cluster.cli"]
    status = subprocess.run([*cli, "status", "--json", "--target", cluster.target, "--api-key", BOB, "--tls-ca", tls["ca"]],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert sorted(w["role"] for w in json.loads(status.stdout)["workers"]) == ["decode", "prefill"]
    without_key = {k: v for k, v in os.environ.items() if k != "PDSERVE_API_KEY"}
    refused = subprocess.run([*cli, "generate", "Hi", "--target", cluster.target, "--tls-ca", tls["ca"]],
                             capture_output=True, text=True, timeout=60, env=without_key)  # fmt: skip
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    wait_all_free(cluster, tls)


def test_tls_is_required_and_verified(cluster, tls):
    with grpc.insecure_channel(cluster.target) as channel:  # plaintext to the TLS port
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=bearer(ALICE))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{cluster.http_port}/health", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # a CA the client does not trust
        httpx.get(f"{cluster.base_url}/health", timeout=10)
    with client.channel(cluster.target, tls["ca"]) as channel:
        info = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=bearer(ALICE))
    assert info.model_name == MODEL

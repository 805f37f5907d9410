"""The one validation both front ends share, and the API-key check, on their own."""

import asyncio

import pytest

from engine.tokenizer import Tokenizer
from router.auth import Auth
from router.validation import MAX_REQUEST_ID_BYTES, InvalidRequest, ModelLimits, RequestSpec, check_request_id, off_the_loop, validate

LIMITS = ModelLimits(max_model_len=64, vocab_size=49152)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return Tokenizer(default_model_dir)


def test_a_spec_becomes_token_ids_and_sampling_params(tokenizer):
    ids, params = validate(RequestSpec(prompt="Hello there", temperature=0, stop=("x",), min_tokens=2, logprobs=3), tokenizer, LIMITS)
    assert ids == tokenizer.encode("Hello there")
    assert (params.max_tokens, params.temperature, params.stop, params.min_tokens, params.logprobs) == (16, 0, ("x",), 2, 3)
    chat = [{"role": "user", "content": "Hi"}]
    ids, params = validate(RequestSpec(messages=tuple(chat), default_max_tokens=None), tokenizer, LIMITS)
    assert ids == tokenizer.encode_chat(chat) and params.max_tokens == 64 - len(ids)  # as many as fit
    assert validate(RequestSpec(token_ids=(5, 6), max_tokens=3), None, LIMITS)[1].max_tokens == 3
    params = validate(RequestSpec(token_ids=(5,), min_p=0.1, presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.1), None, LIMITS)[1]
    assert (params.min_p, params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.1, 0.5, -1, 1.1)


def test_bad_words_are_spelled_by_the_tokenizer(tokenizer):
    params = validate(RequestSpec(prompt="Hi", bad_words=("hello",)), tokenizer, LIMITS)[1]
    assert params.bad_words_token_ids == tokenizer.bad_word_ids(("hello",), LIMITS.vocab_size)
    with pytest.raises(InvalidRequest, match="bad_words needs the model's tokenizer"):
        validate(RequestSpec(token_ids=(5,), bad_words=("hello",)), None, LIMITS)


def test_a_truncated_prompt_keeps_its_last_tokens():
    long = tuple(range(1, 101))  # longer than the model's 64
    assert validate(RequestSpec(token_ids=long, truncate_prompt_tokens=10), None, LIMITS)[0] == list(range(91, 101))
    ids, params = validate(RequestSpec(token_ids=long, truncate_prompt_tokens=-1, max_tokens=4), None, LIMITS)
    assert ids == list(range(41, 101)) and params.max_tokens == 4  # room for max_tokens in 64


def test_text_that_cannot_fit_is_refused_without_being_tokenized(tokenizer, monkeypatch):
    """A token's text has at most max_token_chars characters (its vocabulary entry's), so longer text
    cannot fit in max_model_len tokens: refused before encode, which would hold the router's loop."""
    most = LIMITS.max_model_len * tokenizer.max_token_chars
    fits = " " * most  # at the bound: tokenized, then refused for its token count
    with pytest.raises(InvalidRequest, match="maximum context length"):
        validate(RequestSpec(prompt=fits), tokenizer, LIMITS)
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized"))
    with pytest.raises(InvalidRequest, match=f"64 tokens. However, the prompt text has {most + 1} characters: more than 64 tokens can hold"):
        validate(RequestSpec(prompt=fits + "x"), tokenizer, LIMITS)
    with pytest.raises(InvalidRequest, match="the messages text has"):
        validate(RequestSpec(messages=({"role": "user", "content": fits}, {"role": "user", "content": "x"})), tokenizer, LIMITS)


def test_a_grpc_request_becomes_the_same_spec_with_unset_fields_as_none():
    from protos import generation_pb2 as pb
    from router.server import request_spec

    sampling = pb.SamplingParams(max_tokens=5, top_k=3, min_p=0.25, presence_penalty=0.5, repetition_penalty=1.5, logit_bias={7: -2.0, 3: 1.0})
    spec = request_spec(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=sampling))
    assert spec.token_ids == (1, 2) and (spec.max_tokens, spec.top_k, spec.min_p) == (5, 3, 0.25)
    assert (spec.presence_penalty, spec.frequency_penalty, spec.repetition_penalty, spec.temperature) == (0.5, None, 1.5, None)
    assert spec.logit_bias == ((3, 1.0), (7, -2.0))
    params = validate(spec, None, LIMITS)[1]
    assert params.logit_bias == ((3, 1.0), (7, -2.0)) and (params.skip_special_tokens, params.include_stop_str_in_output) == (True, False)
    chat = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]), add_generation_prompt=False,
                              continue_final_message=True, sampling=pb.SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True,
                                                                                      allowed_token_ids=[4, 2], bad_words=["no"]))  # fmt: skip
    spec = request_spec(chat)
    assert (spec.add_generation_prompt, spec.continue_final_message, spec.skip_special_tokens, spec.include_stop_str_in_output) == (
        False, True, False, True)  # fmt: skip
    assert spec.allowed_token_ids == (4, 2) and request_spec(pb.GenerateRequest(prompt="x")).allowed_token_ids is None
    assert spec.bad_words == ("no",)
    assert request_spec(pb.GenerateRequest(prompt="x")).add_generation_prompt is True
    assert request_spec(pb.GenerateRequest(prompt="x", truncate_prompt_tokens=-1)).truncate_prompt_tokens == -1
    assert request_spec(pb.GenerateRequest(prompt="x")).truncate_prompt_tokens is None


@pytest.mark.parametrize("spec, message, param", [
    (RequestSpec(), "has no input", None),
    (RequestSpec(prompt="a", token_ids=(1,)), "more than one input (prompt, token_ids)", None),
    (RequestSpec(messages=({"content": "x"},)), "every message needs a role", "messages"),
    (RequestSpec(prompt="x", continue_final_message=True), "apply to messages only", None),
    (RequestSpec(token_ids=(1, 2), truncate_prompt_tokens=0), "truncate_prompt_tokens must be -1 or >= 1", "truncate_prompt_tokens"),
    (RequestSpec(token_ids=(1, 2), truncate_prompt_tokens=-1, max_tokens=64), "truncate_prompt_tokens must be -1 or >= 1", "truncate_prompt_tokens"),
    (RequestSpec(token_ids=(1,), stop_token_ids=(49152,)), "stop token id 49152 is outside the vocabulary", "stop_token_ids"),
    (RequestSpec(token_ids=(1,) * 64), "maximum context length is 64 tokens. However, your request has 64 input tokens", "token_ids"),
    (RequestSpec(prompt=" a" * 100), "maximum context length is 64", "prompt"),
    (RequestSpec(token_ids=(1,), max_tokens=64), "you requested 65 tokens (1 in the input, 64 in the completion): max_tokens can be at most 63", "max_tokens"),
    (RequestSpec(token_ids=(1,), max_tokens=4, min_tokens=5), "min_tokens must be an integer in [0, max_tokens=4]", "min_tokens"),
    (RequestSpec(token_ids=(1,), logprobs=21), "logprobs must be an integer in [0, 20]", "logprobs"),
    (RequestSpec(token_ids=(1,), temperature=float("nan")), "temperature is NaN", "temperature"),
    (RequestSpec(token_ids=(1,), temperature=-1), "temperature must be >= 0", "temperature"),
    (RequestSpec(token_ids=(1,), stop=("",)), "stop strings must be non-empty", "stop"),
    (RequestSpec(token_ids=(1,), repetition_penalty=float("nan")), "repetition_penalty is NaN", "repetition_penalty"),
    (RequestSpec(token_ids=(1,), frequency_penalty=2.5), "frequency_penalty must be in [-2, 2]", "frequency_penalty"),
])  # fmt: skip
def test_bad_specs_are_refused_with_the_reason_and_the_field_at_fault(tokenizer, spec, message, param):
    with pytest.raises(InvalidRequest) as e:
        validate(spec, tokenizer, LIMITS)
    assert message in str(e.value) and e.value.param == param
    assert e.value.code == ("context_length_exceeded" if "maximum context length" in str(e.value) else None)


def test_special_tokens_are_added_to_a_prompt_not_to_messages_unless_asked():
    """As vLLM's add_special_tokens: None is each input's default."""

    class Recording:
        max_token_chars = 16

        def encode(self, text, add_special_tokens=True):
            return [1, 2] if add_special_tokens else [2]

        def encode_chat(self, messages, add_generation_prompt, continue_final_message, add_special_tokens=False, template_kwargs=None):
            return self.encode("chat", add_special_tokens)

    chat = ({"role": "user", "content": "Hi"},)
    for spec, ids in ((RequestSpec(prompt="x"), [1, 2]), (RequestSpec(prompt="x", add_special_tokens=False), [2]),
                      (RequestSpec(messages=chat), [2]), (RequestSpec(messages=chat, add_special_tokens=True), [1, 2])):  # fmt: skip
        assert validate(spec, Recording(), LIMITS)[0] == ids, spec


def test_keys_are_checked_as_bearer_tokens_and_identify_their_caller():
    auth = Auth.from_keys(["k1", "k2"], ["root"])
    assert auth.caller("Bearer k1") and auth.caller("bearer  k1 ") == auth.caller("Bearer k1") != auth.caller("Bearer k2")
    assert auth.caller("Bearer root") and auth.is_admin("Bearer root") and not auth.is_admin("Bearer k1")
    for refused in (None, "", "k1", "Basic k1", "Bearer", "Bearer k3"):
        assert auth.caller(refused) is None and not auth.is_admin(refused)
    assert "k1" not in repr(auth)  # only digests are kept
    assert Auth().caller(None) == "" and Auth().is_admin(None)  # no keys: open
    with pytest.raises(ValueError):
        Auth.from_keys([""])


def test_request_ids_are_bounded_in_bytes():
    assert check_request_id("") == "" and check_request_id("é" * (MAX_REQUEST_ID_BYTES // 2)) == "é" * (MAX_REQUEST_ID_BYTES // 2)
    with pytest.raises(InvalidRequest, match="257 bytes"):
        check_request_id("é" * 128 + "x")


def test_text_is_tokenized_off_the_event_loop(tokenizer):
    """A long text's tokenization runs on a thread and lets go of the GIL: the front ends' event
    loop (every stream's) keeps turning meanwhile; token ids are checked in place."""
    text = "The quick brown fox jumps over the lazy dog. " * 20_000

    async def body():
        ticks, done = 0, asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0)
                ticks += 1

        ticking = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        ids = await off_the_loop([RequestSpec(prompt=text)], lambda: tokenizer.encode(text))
        done.set()
        await ticking
        inline = await off_the_loop([RequestSpec(token_ids=(1, 2))], lambda: "in place")
        return ids, ticks, inline

    ids, ticks, inline = asyncio.run(body())
    assert len(ids) > 100_000 and ticks >= 1000 and inline == "in place"  # holding the GIL (encode): ~80 ticks here

"""Our tokenizer wrapper against transformers' own tokenizer, and incremental detokenization."""

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines",
    "Unicode: naïve café, 日本語のテキスト, emoji 🤖🚀 and ✓",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "def f(x):\n    return x ** 2  # code",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],  # fmt: skip
]


@pytest.fixture(scope="module")
def ours(default_model_dir):
    return Tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def theirs(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(ours, theirs, text):
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(ours, theirs, messages):
    text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(messages) == text
    assert ours.encode_chat(messages) == theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )


@pytest.mark.parametrize("final", ["Sure, the answer is", "  spaced out  "])
def test_a_continued_final_message_matches_transformers(ours, theirs, final):
    messages = [*CONVERSATIONS[1], {"role": "assistant", "content": final}]
    text = theirs.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True, tokenize=False)
    assert ours.render_chat(messages, add_generation_prompt=False, continue_final_message=True) == text
    assert ours.encode_chat(messages, False, True) == theirs.apply_chat_template(messages, add_generation_prompt=False,
                                                                                 continue_final_message=True, return_dict=False)  # fmt: skip


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(ours, text):
    prompt = ours.encode("Say something:")
    ids = ours.encode(text)
    detok = IncrementalDetokenizer(ours, prompt)
    deltas = []
    for token in ids:
        detok.add_tokens([token])
        deltas.append(detok.take_delta(finished=False))
    deltas.append(detok.take_delta(finished=True))
    assert "".join(deltas) == detok.text == ours.decode(ids)
    assert all("\ufffd" not in d for d in deltas)  # never half a character


def test_stop_string_is_cut_and_never_streamed(ours):
    ids = ours.encode("The answer is 42. END of story, more text")
    detok = IncrementalDetokenizer(ours, [], stop=(" END", "zzz"))
    streamed = ""
    for token in ids:
        detok.add_tokens([token])
        streamed += detok.take_delta(finished=detok.stopped)
        if detok.stopped:
            break
    assert streamed == detok.text == "The answer is 42."
    assert detok.add_tokens(ours.encode(" later")) == 0 and detok.text == "The answer is 42."


def test_stop_inside_a_batch_of_tokens_reports_how_many_were_taken(ours):
    ids = ours.encode("one two three four")
    detok = IncrementalDetokenizer(ours, [], stop=(" two",))
    taken = detok.add_tokens(ids)
    assert detok.stopped and 0 < taken < len(ids) and detok.text == "one"
    assert ours.decode(ids[:taken]).startswith("one two")


def test_bad_words_are_spelled_alone_and_after_a_space(ours):
    (alone, spaced) = ours.bad_word_ids(("hello",), ours.vocab_size)
    assert list(alone) == ours.encode("hello") and list(spaced) == ours.encode(" hello") and alone != spaced


def test_stop_string_kept_in_the_text_when_asked(ours):
    detok = IncrementalDetokenizer(ours, [], stop=("tw", "two", " thr"), include_stop=True)
    detok.add_tokens(ours.encode("one two three four"))
    assert detok.stopped and detok.text == "one two"  # two stop strings end in the token " two": the longer is kept


def test_special_tokens_in_the_text_when_not_skipped(ours):
    ids = ours.encode("a<|im_end|>b")
    for skip, text in ((True, "ab"), (False, "a<|im_end|>b")):
        detok = IncrementalDetokenizer(ours, [], skip_special_tokens=skip)
        detok.add_tokens(ids)
        assert detok.text == text


def test_stop_string_spanning_tokens_and_holdback(ours):
    detok = IncrementalDetokenizer(ours, [], stop=("STOP_HERE",))
    detok.add_tokens(ours.encode("abc STOP_"))
    partial = detok.take_delta(finished=False)
    assert "STOP" not in partial  # held back: may become a stop string
    detok.add_tokens(ours.encode("HERE tail"))
    assert detok.stopped and partial + detok.take_delta(finished=True) == "abc "


def test_a_prompt_cut_inside_a_character_streams_from_that_character_on(ours):
    """Token ids cut mid-emoji or mid-CJK (a client continuing a completion max_tokens cut): the
    character's first bytes are the prompt's, and the output starts with the whole character. The
    stream used to take the cut for text already shown and re-emit the prompt's words with it."""
    ids = ours.encode("Hello 😀 world 日本語 end")
    whole = ours.decode(ids)
    complete = lambda n: next(k for k in range(n, -1, -1) if not ours.decode(ids[:k]).endswith("\ufffd"))  # noqa: E731
    for cut in range(1, len(ids)):
        detok = IncrementalDetokenizer(ours, ids[:cut])
        deltas = []
        for token in ids[cut:]:
            detok.add_tokens([token])
            deltas.append(detok.take_delta(finished=False))
        text = "".join(deltas) + detok.take_delta(finished=True)
        assert ours.decode(ids[: complete(cut)]) + text == whole, cut  # from the first token of the cut character on
        assert "\ufffd" not in text, cut


def test_stop_strings_count_only_after_min_tokens(ours):
    """vLLM's rule: a stop string counts once min_tokens tokens are out, and only if it ends in a
    later token's text (one wholly inside the first min_tokens is not taken back later)."""
    ids = ours.encode(" one two three four five")
    assert len(ids) == 5  # a token a word
    for min_tokens, offset, text in ((0, 0, " one"), (2, 0, " one two"), (4, 0, " one two three four five"), (2, 1, " one")):
        detok = IncrementalDetokenizer(ours, [], stop=(" t",), min_tokens=min_tokens, output_offset=offset)
        detok.add_tokens(ids)
        assert detok.text == text, (min_tokens, offset)


def test_a_stop_token_adds_no_text_unless_asked(ours):
    """EOS or a stop token id that ends the request: its text is not output, as vLLM's (the token id is)."""
    ids = ours.encode(" hello world.")
    for include, text in ((False, " hello world"), (True, " hello world.")):
        detok = IncrementalDetokenizer(ours, [], include_stop=include)
        assert detok.add_tokens(ids, ends_with_stop_token=True) == len(ids) and detok.text == text


def test_a_chat_template_that_refuses_the_messages_raises_a_value_error(ours, monkeypatch):
    monkeypatch.setattr(ours, "chat_template", "{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ValueError, match="refused these messages: Conversation roles must alternate"):
        ours.encode_chat([{"role": "user", "content": "hi"}])

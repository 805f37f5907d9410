"""Output text of one request, token by token, with stop strings.

Decoding token by token must not cut a multi-byte character or drop a word-initial
space, so each step decodes a short window (prefix_offset..end) and emits only the part
past what the window's first tokens (prefix_offset..read_offset) already produced, and only
once it no longer ends in U+FFFD (an incomplete UTF-8 sequence). The tokenizer's decode
stream does exactly that in compiled code (the `tokenizers` library's DecodeStream: a few
microseconds a token, where two Python-level decodes a token cost ~25), fed the prompt's last
tokens first, one by one: a prompt that ends inside a character (token ids cut mid-emoji) leaves
its first bytes pending, to come out with the output token that completes it. (Given them as
its starting context instead, the stream took the incomplete character for text already shown,
and re-emitted the prompt's last words with it.)

Stop strings end the output before the stop string (after it, with include_stop: vLLM's
include_stop_str_in_output), and count only once min_tokens tokens are out (vLLM's rule: a stop
string must end in a later token's text). A stop token (EOS, a stop token id) adds no text
unless include_stop, as vLLM's. Streamed text holds back its last len(longest stop) - 1
characters until the request finishes, so a client never sees the start of a stop string that
is then taken back.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded alongside the first outputs


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = (), skip_special_tokens: bool = True,
                 include_stop: bool = False, min_tokens: int = 0, output_offset: int = 0):  # fmt: skip
        """output_offset: output tokens already counted (a resumed request's, part of its prompt here)."""
        self.stop = stop
        self.include_stop = include_stop
        self._min_tokens, self._outputs = min_tokens, output_offset
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._step = tokenizer.decode_stream(skip_special_tokens)
        for token in prompt_token_ids[-_CONTEXT_TOKENS:]:
            self._step(token)
        self.text = ""
        self._emitted = 0
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that ended the text

    def add_tokens(self, token_ids: list[int], ends_with_stop_token: bool = False) -> int:
        """Extend the text; returns how many of the tokens were taken: all of them, or up to the
        one that completed a stop string (then `stopped` is set and the text ends before it).
        ends_with_stop_token: the last one is the EOS or stop token id that ended the request."""
        taken = 0
        for i, token in enumerate(token_ids):
            if self.stopped:
                break
            taken += 1
            self._outputs += 1
            if ends_with_stop_token and i == len(token_ids) - 1 and not self.include_stop:
                break
            piece = self._step(token)
            if piece:
                before = len(self.text)
                self.text += piece
                if self._outputs > self._min_tokens:
                    self._check_stop(before)
        return taken

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while unfinished, minus what could still start a stop string."""
        end = len(self.text) if finished or self.stopped else max(self._emitted, len(self.text) - self._holdback)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _check_stop(self, before: int) -> None:
        """A stop string that ends in the text past `before` (one that ended earlier was either
        caught then or came under min_tokens)."""
        if not self.stop:
            return
        hits = [(i, -len(s), s) for s in self.stop if (i := self.text.find(s, max(0, before - len(s) + 1))) != -1]
        if hits:
            start, minus_length, self.stop_string = min(hits)  # the earliest; at one place, the longest
            self.text = self.text[: start - minus_length if self.include_stop else start]
            self.stopped = True

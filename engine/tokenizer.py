"""A model folder's tokenizer: tokenizer.json through the `tokenizers` library and the chat
template through sandboxed Jinja, as transformers' fast tokenizers do, without importing
transformers (which costs ~3 s of every worker's start).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream


class Tokenizer:
    def __init__(self, model_dir: Path):
        self._tok = _HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = model_dir / "chat_template.jinja"
        self.chat_template = template_path.read_text() if template_path.is_file() else config.get("chat_template")
        self._special = {
            key: (value["content"] if isinstance(value, dict) else value)
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (value := config.get(key))
        }
        self.vocab_size = self._tok.get_vocab_size()
        # The most characters one token's text can have (a vocabulary entry's text is at least as
        # long as its decoded text): text longer than n x this cannot fit in n tokens.
        self.max_token_chars = max(map(len, self._tok.get_vocab(with_added_tokens=True)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it): a long prompt tokenized
        # on a thread then leaves the router's event loop running.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def bad_word_ids(self, words: tuple[str, ...], vocab_size: int) -> tuple[tuple[int, ...], ...]:
        """vLLM's spelling of bad_words: each word's token ids alone and after a space (as it
        reads mid-text), the spaced form only where it is another sequence of the same length.
        A spelling with a token past the model's vocab_size (a tokenizer's added tokens) can never
        be generated: nothing to ban, and the sampler would index past the logits."""
        out = []
        for word in words:
            alone = tuple(self.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.encode(" " + word.lstrip(), add_special_tokens=False))
            out += [alone] + ([spaced] if spaced[0] != alone[0] and len(spaced) == len(alone) else [])
        return tuple(ids for ids in out if max(ids) < vocab_size)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> Callable[[int], str | None]:
        """Incremental decoding: each call takes the next token id and returns the new text, or None
        while it is an incomplete character (then it comes with a later token)."""
        return functools.partial(DecodeStream(skip_special_tokens=skip_special_tokens).step, self._tok)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False,
                    template_kwargs: dict | None = None) -> str:  # fmt: skip
        """The conversation in the model's chat template, as transformers' apply_chat_template: with
        continue_final_message the text ends inside the final message, after its content (no
        end-of-turn), so the model continues that message. template_kwargs are more of the
        template's variables (vLLM's chat_template_kwargs, e.g. enable_thinking)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        variables = {"messages": messages, "add_generation_prompt": add_generation_prompt, **self._special}
        if taken := sorted(set(template_kwargs or ()) & (set(variables) | set(_jinja().globals))):
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(taken)}: the request or the template's environment sets it")
        try:
            text = _compiled(self.chat_template).render(**variables, **(template_kwargs or {}))
        except jinja2.exceptions.TemplateError as e:  # e.g. the template's raise_exception on bad roles
            raise ValueError(f"the chat template refused these messages: {e}") from None
        if not continue_final_message:
            return text
        final = messages[-1].get("content") or ""
        if not final.strip() or final.strip() not in text:
            raise ValueError("continue_final_message: the final message's content is not in the rendered chat")
        start = text.rindex(final.strip())
        # Where the template kept the message's spacing, the text ends with it as given; else trimmed.
        kept = text[start : start + len(final.lstrip())] == final.lstrip()
        return text[: start + len(final.lstrip() if kept else final.strip())]

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False,
                    add_special_tokens: bool = False, template_kwargs: dict | None = None) -> list[int]:  # fmt: skip
        # The template already places the special tokens; by default encoding adds no more.
        text = self.render_chat(messages, add_generation_prompt, continue_final_message, template_kwargs)
        return self.encode(text, add_special_tokens=add_special_tokens)


def load_tokenizer(model_dir: Path) -> Tokenizer | None:
    if (model_dir / "tokenizer.json").is_file():
        return Tokenizer(model_dir)
    if any((model_dir / f).is_file() for f in ("tokenizer.model", "tokenizer_config.json", "vocab.json")):
        raise ValueError(f"{model_dir} has a tokenizer but no tokenizer.json; save it with a fast tokenizer")
    return None  # no tokenizer at all: prompts must be token ids


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """A chat template compiled once (milliseconds for a long one), not per request."""
    return _jinja().from_string(template)


@functools.cache
def _jinja() -> jinja2.Environment:
    """The environment transformers renders chat templates in: sandboxed, trimmed blocks,
    loop controls, tojson, raise_exception and strftime_now."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env

"""The offline Python API: `LLM(model=None, **options).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from tqdm import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **options):
        self.engine = LLMEngine(EngineConfig(model=model, **options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in order. Every prompt is validated before any
        is queued, so a bad one leaves nothing behind."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        token_ids = [self.engine.tokenize(p) for p in prompts]
        for ids in token_ids:
            self.engine.validate_prompt(ids)
        request_ids = [self.engine.add_request(None, ids, p) for ids, p in zip(token_ids, params)]
        finished: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(prompts), disable=not use_tqdm, desc="generate") as bar:
                while len(finished) < len(request_ids):
                    for out in self.engine.step():
                        if out.finished:
                            finished[out.request_id] = out
                            bar.update(1)
        finally:
            for request_id in request_ids:
                if request_id not in finished:
                    self.engine.abort(request_id)
        return [finished[r] for r in request_ids]

    def reset_prefix_cache(self) -> int:
        """As vLLM's LLM.reset_prefix_cache: no cached prompt blocks are reused after it."""
        return self.engine.allocator.reset_prefix_cache()

    def chat(self, messages: list[dict] | Seq[list[dict]], params=None, use_tqdm: bool = False, add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> list[RequestOutput]:  # fmt: skip
        """Like generate, on conversations rendered with the model's chat template (as vLLM's
        LLM.chat: continue_final_message ends the prompt inside the final message)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c, add_generation_prompt, continue_final_message) for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.tokenizer.encode_chat(messages, add_generation_prompt, continue_final_message)

"""LLMEngine: one device's engine, driven step by step.

    engine.add_request(id, prompt, params)   # queue a request
    outputs = engine.step()                  # schedule -> run -> postprocess; new tokens of all
    engine.abort(id)                         # sequences that moved, once per step

The prefill and decode workers drive the same engine in a role:
    prefill: add_request(..., prefill_only=True); the request finishes with reason
             "prefilled" after its first token and keeps its blocks (output.block_ids) until
             release(id), once the decode worker has the KV.
    decode:  reserve(id, n_prompt_tokens) -> block ids to receive the KV into, then
             add_prefilled(id, prompt_ids, first_token, params, first_logprobs); abort(id) frees a
             reservation. take_outputs() reports the first token at once (else the next step does,
             with the token that step samples).
A request resumed here after its worker died passes `output_offset`: its prompt ends with the
tokens it had already produced, that many (see engine.sequence).

With engine="mock[:PROFILE]" a MockRunner stands in for the model (engine.mock_runner): no
weights are loaded, the KV pool has the profiled model's layout, and the engine is ready no
sooner than the profile's start-up time after it began.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from safetensors import safe_open

from engine.attention import CpuAttention, make_attention_backend
from engine.block_allocator import BlockAllocator
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import KVCache, num_blocks_for
from engine.model import LlamaForCausalLM, RotaryEmbedding
from engine.model_files import model_name, resolve_model_dir
from engine.mock_runner import MockRunner, mock_kv_model, sleep_until, token_space
from engine.model_runner import ModelRunner
from engine.outputs import RequestOutput, TokenLogprobs
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.tokenizer import load_tokenizer
from engine.sequence import FinishReason, Sequence
from kernels import cpu_attention

logger = logging.getLogger(__name__)


PrefillLayerHook = Callable[[int, list[tuple[str, list[int]]]], None]


@dataclass(frozen=True)
class KVStats:
    total: int
    free: int  # never computed or evicted
    cached: int  # unreferenced, holding a reusable prefix (counted separately from free)
    in_use: int  # referenced by live requests


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **options):
        if config is None:
            config = EngineConfig(**options)
        elif options:
            raise TypeError("pass either an EngineConfig or keyword options, not both")
        start = time.perf_counter()
        self.model_dir = resolve_model_dir(config.model)
        self.model_name = model_name(config.model)
        self.model_config = load_model_config(self.model_dir)
        self.config = config = config.resolve(self.model_config)
        self.tokenizer = load_tokenizer(self.model_dir) if config.detokenize else None
        self.device = torch.device(config.device)

        profile = config.load_profile()
        if profile is None:
            backend = make_attention_backend(
                config.attention_backend, self.model_config.num_heads, self.model_config.num_kv_heads,
                self.model_config.head_dim, config.block_size,
            )  # fmt: skip
            self.model = _load_model(self.model_dir, self.model_config, backend, config)
            kv_model = self.model_config
        else:
            self.model = None
            kv_model = mock_kv_model(self.model_config, profile, config.mock_kv_fraction)
        num_blocks = num_blocks_for(kv_model, config, self.device)
        self.kv_cache = KVCache(kv_model, num_blocks, config.block_size, config.torch_dtype, self.device)
        self.allocator = BlockAllocator(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.allocator, self.model_config.eos_token_ids)
        if profile is None:
            argmax = functools.partial(cpu_attention.argmax, backend.library) if isinstance(backend, CpuAttention) else None
            sampler = Sampler(config.seed, self.device, self.model_config.eos_token_ids, argmax)
            self.runner = ModelRunner(self.model, self.kv_cache, backend, sampler, self.device)
        else:
            vocab, excluded = token_space(self.model_dir, self.model_config)
            self.runner = MockRunner(profile, self.kv_cache, vocab, excluded, self.model_config.eos_token_ids)
            sleep_until(start + profile.startup_seconds)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._reported: dict[str, int] = {}  # output tokens already reported, per live request
        self._pending: dict[str, Sequence] = {}  # sequences with something to report next step
        self._ids = itertools.count()
        logger.info(
            "engine ready in %.1fs: %s on %s/%s, %s, %d KV blocks of %d tokens (%.2f GiB)",
            time.perf_counter() - start, self.model_name, config.device, config.dtype,
            f"{config.attention_backend} attention" if profile is None else f"mock engine on profile {profile.name}",
            num_blocks, config.block_size, self.kv_cache.nbytes / 2**30,
        )  # fmt: skip

    # --- requests ----------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompts as token id lists")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _up_to_the_context(self, params: SamplingParams, num_tokens: int, output_offset: int) -> SamplingParams:
        """max_tokens=None, as vLLM's: as many as the context leaves after the client's prompt (the
        last output_offset of num_tokens are output already, and count toward max_tokens)."""
        if params.max_tokens is not None:
            return params
        return replace(params, max_tokens=max(1, self.config.max_model_len - num_tokens + output_offset))

    def validate_prompt(self, token_ids: list[int], params: SamplingParams | None = None, output_offset: int = 0) -> None:
        params = self._up_to_the_context(params or SamplingParams(), len(token_ids), output_offset)
        if output_offset and not 0 <= output_offset < min(params.max_tokens, len(token_ids)):
            raise ValueError(f"output_offset {output_offset} must be below max_tokens and the prompt's length")
        if not token_ids:
            raise ValueError("prompt is empty")
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; the maximum is {self.config.max_model_len - 1} "
                f"(max_model_len {self.config.max_model_len} leaves room for at least one new token)"
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab})")

    def _check_token_ids(self, params: SamplingParams) -> None:
        """The ids the sampler indexes the logits with are in the vocabulary (one past it would fail
        the whole batch's step), and min_tokens leaves something to sample."""
        vocab = self.model_config.vocab_size
        for what, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("allowed_token_ids", params.allowed_token_ids or ()),
                          ("bad_words_token_ids", [t for word in params.bad_words_token_ids for t in word])):  # fmt: skip
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab})")
        stops = {*params.stop_token_ids, *self.model_config.eos_token_ids}
        if params.min_tokens and params.allowed_token_ids and set(params.allowed_token_ids) <= stops:
            raise ValueError("allowed_token_ids has only stop and EOS tokens, which min_tokens forbids: nothing could be sampled")

    def add_request(
        self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None, *,
        prefill_only: bool = False, output_offset: int = 0,
    ) -> str:  # fmt: skip
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        token_ids = self.tokenize(prompt)
        params = self._up_to_the_context(params, len(token_ids), output_offset)
        self.validate_prompt(token_ids, params, output_offset)
        if params.bad_words and not params.bad_words_token_ids:
            if self.tokenizer is None:
                raise ValueError("bad_words needs the model's tokenizer: give bad_words_token_ids")
            params = replace(params, bad_words_token_ids=self.tokenizer.bad_word_ids(params.bad_words, self.model_config.vocab_size))
        self._check_token_ids(params)
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(request_id, token_ids, params, prefill_only=prefill_only, output_offset=output_offset)
        self.scheduler.add(seq)
        self._track(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. False if it was not live here."""
        reserved = request_id in self.scheduler.reserved
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._pending[request_id] = seq
        return reserved or seq is not None

    # --- roles -------------------------------------------------------------------------------

    def release(self, request_id: str) -> None:
        """Prefill role: the KV has been delivered; the request's blocks become prefix cache."""
        self.scheduler.release(request_id)

    def reserve(self, request_id: str, num_prompt_tokens: int) -> list[int] | None:
        return self.scheduler.reserve(request_id, num_prompt_tokens)

    def add_prefilled(
        self, request_id: str, prompt_token_ids: list[int], first_token: int, params: SamplingParams,
        first_logprobs: TokenLogprobs | None = None, output_offset: int = 0,
    ) -> None:  # fmt: skip
        params = self._up_to_the_context(params, len(prompt_token_ids), output_offset)
        seq = Sequence(request_id, prompt_token_ids, params, output_offset=output_offset)
        self.scheduler.add_prefilled(seq, first_token, first_logprobs)
        self._track(seq)
        self._pending[request_id] = seq

    def _track(self, seq: Sequence) -> None:
        self._reported[seq.request_id] = 0
        if self.tokenizer is not None:
            p = seq.params
            self._detokenizers[seq.request_id] = IncrementalDetokenizer(
                self.tokenizer, seq.token_ids[: seq.num_prompt_tokens], p.stop, p.skip_special_tokens, p.include_stop_str_in_output,
                p.min_tokens, seq.output_offset,
            )

    # --- stepping ----------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    def step(self, on_layer: PrefillLayerHook | None = None) -> list[RequestOutput]:
        """One step: schedule -> run -> postprocess. `on_layer(i, completing)` is called as each
        layer's KV lands in the cache, with the prefill-only requests whose prompt completes in
        this step as (request_id, block_ids) (the prefill worker ships those layers then)."""
        start, start_cpu = time.perf_counter(), time.thread_time()
        batch = self.scheduler.schedule()
        if batch:
            hook = None
            if on_layer is not None:
                completing = [(s.request_id, list(s.block_table)) for s in batch.seqs
                              if s.prefill_only and s.num_computed_tokens + s.num_scheduled_tokens == len(s)]  # fmt: skip
                hook = (lambda i: on_layer(i, completing)) if completing else None
            now = time.perf_counter()
            for seq in batch.seqs:
                seq.first_scheduled_time = seq.first_scheduled_time or now
            sampled = self.runner.run(batch, hook)
            self.scheduler.postprocess(batch, sampled.token_ids, sampled.logprobs, sampled.prompt_logprobs)
            for seq in batch.seqs:
                self._pending[seq.request_id] = seq
            self.scheduler.stats.busy_cpu_seconds += time.thread_time() - start_cpu  # read inside the wall-clock interval
            self.scheduler.stats.busy_seconds += time.perf_counter() - start
        return self.take_outputs()

    def take_outputs(self) -> list[RequestOutput]:
        """What changed since the last report: the step's tokens, or, called between steps, what
        changed outside one (a prefilled sequence's first token), reported now rather than with
        the next step's tokens."""
        outputs = []
        for request_id, seq in self._pending.items():
            if request_id not in self._reported:
                continue  # finished and reported already
            done = self._reported[request_id]
            new = seq.output_token_ids[done:]
            if not new and not seq.is_finished:
                continue
            detok = self._detokenizers.get(request_id)
            new_text = ""
            if detok is not None:
                detok.add_tokens(new, ends_with_stop_token=seq.finish_reason is FinishReason.STOP)
                if detok.stopped and not seq.is_finished:
                    self.scheduler.finish(seq, FinishReason.STOP)
                elif detok.stopped:  # the stop string came with the last token max_tokens allowed: still a stop
                    seq.finish_reason = FinishReason.STOP
                new_text = detok.take_delta(seq.is_finished)
            self._reported[request_id] = done + len(new)
            outputs.append(
                RequestOutput(
                    request_id=request_id,
                    prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
                    token_ids=seq.output_token_ids,
                    new_token_ids=new,
                    text=detok.text if detok is not None else "",
                    new_text=new_text,
                    finished=seq.is_finished,
                    finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                    num_cached_tokens=seq.num_cached_tokens,
                    first_scheduled_time=seq.first_scheduled_time,
                    block_ids=list(seq.block_table) if seq.finish_reason is FinishReason.PREFILLED else [],
                    logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                    prompt_logprobs=seq.prompt_logprobs if len(seq.prompt_logprobs) == seq.num_prompt_tokens else None,
                )
            )
            if seq.is_finished:
                del self._reported[request_id]
                self._detokenizers.pop(request_id, None)
        self._pending.clear()
        return outputs

    # --- introspection -----------------------------------------------------------------------

    def kv_stats(self) -> KVStats:
        a = self.allocator
        cached = a.num_cached
        return KVStats(total=a.num_blocks, free=a.num_free - cached, cached=cached, in_use=a.num_in_use)

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()

    def stats(self) -> dict:
        """What `pdserve status` shows per worker."""
        kv, st = self.kv_stats(), self.scheduler.stats
        sched = self.scheduler
        return {
            "running": len(sched.running),
            "waiting": len(sched.waiting) + len(sched.reserved),
            "kv_blocks": {"total": kv.total, "free": kv.free, "cached": kv.cached, "in_use": kv.in_use},
            "prefix_cache": {"query_tokens": st.prefix_query_tokens, "hit_tokens": st.prefix_hit_tokens},
            "reserved_blocks": sum(len(blocks) for blocks in sched.reserved.values()),
            "preemptions": st.preemptions,
            "steps": st.steps,
            "chunked_prefill_steps": st.chunked_prefill_steps,
            # cumulative, for the autoscaler's windows
            "busy_seconds": st.busy_seconds, "prompt_tokens": st.prompt_tokens, "refused": st.refused_reservations,
            # cumulative too: the engine thread's CPU time in those steps; the rest of busy_seconds waited (for a core, a lock)
            "busy_cpu_seconds": st.busy_cpu_seconds,
            **({"mock_late_steps": self.runner.late_steps} if isinstance(self.runner, MockRunner) else {}),
        }


def load_model_config(model_dir) -> ModelConfig:
    generation = model_dir / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    return ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text()), eos)


def _load_model(model_dir, cfg: ModelConfig, backend, config: EngineConfig) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, backend, config.max_model_len)
    model = model.to_empty(device=config.device).to(config.torch_dtype)
    # The RoPE tables are not in the checkpoint; build them for real (float32, like transformers).
    model.rotary = RotaryEmbedding(cfg, config.max_model_len).to(config.device)

    def tensors():
        for path in sorted(model_dir.glob("*.safetensors")):
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    model.load_weights(tensors())
    model.pack_linears(config.max_num_seqs)  # a step's decode rows, the batch oneDNN lays the weights out for
    return model.eval()

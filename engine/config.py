"""Configuration: what the model is (ModelConfig) and how one engine runs it (EngineConfig).

Both are frozen. EngineConfig holds the user's options; `EngineConfig.resolve` validates them
once at start-up and returns a derived copy with every "auto" replaced by a concrete value.

`engine` picks what computes a step: "real" (the model), or "mock" / "mock:PROFILE" (a timed
stand-in driven by a cost profile: a file, or the name of one in benchmarks/profiles/; see
engine.mock_runner). A mock engine loads no weights. Its "auto" device is the CPU, its "auto"
dtype the profiled KV dtype, and without num_kv_blocks or kv_cache_gb its pool holds the
profile's kv_capacity_tokens (when recorded): a mock worker holds as many tokens as the
profiled machine would.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from engine.cost_model import CostProfile, load_profile
from kernels import cpu_attention

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
DEFAULT_CHUNK_SIZE = 512
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder, read from a Hugging Face config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...]  # rope_parameters minus rope_theta, as sorted pairs
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: str  # dtype the weights were saved in

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @classmethod
    def from_dict(cls, hf: dict[str, Any], generation_eos: Any = None) -> "ModelConfig":
        """From a Hugging Face config.json (old and new RoPE field layouts both accepted)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type", "default")
        if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported RoPE type {rope['rope_type']!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        num_heads = hf["num_attention_heads"]
        max_len = hf["max_position_embeddings"]
        window = hf.get("sliding_window")
        # A sliding window never bites if no sequence is longer than it, so cap the length there.
        if window and (model_type == "mistral" or hf.get("use_sliding_window")):
            max_len = min(max_len, window)
        eos = generation_eos if generation_eos is not None else hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        dtype_name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf["rms_norm_eps"]),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=max_len,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias covers all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            checkpoint_dtype=dtype_name if dtype_name in DTYPES else "float32",
        )


@dataclass(frozen=True)
class EngineConfig:
    """Options of one engine. Defaults are what `LLM()` and the workers use."""

    model: str | None = None  # HF folder or .gguf file; None = the default SmolLM2-135M-Instruct
    device: str = "auto"  # "auto" = cuda if available, else cpu
    dtype: str = "auto"  # "auto" = float32 on CPU, the checkpoint's half dtype (or bfloat16) on CUDA
    attention_backend: str = "auto"  # "auto" = triton on CUDA; on CPU, cpu where its C kernel fits and builds, else torch
    block_size: int = 16
    max_model_len: int | None = None  # None = the model's maximum
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget of one step
    enable_chunked_prefill: bool = True  # split long prompts across steps (else a prompt runs whole)
    chunk_size: int | None = None  # most tokens of one prompt per step; None = min(512, budget)
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # explicit pool size in blocks; wins over any memory budget
    kv_cache_gb: float | None = None  # explicit KV pool size; wins over the fraction
    kv_cache_memory_fraction: float | None = None  # of free memory; None = 0.9 on CUDA, 0.1 on CPU
    device_share: float = 1.0  # of the GPU this engine may fill: engines packed on one GPU each keep to theirs
    seed: int = 0  # for requests sampled without their own seed
    detokenize: bool = True  # load the tokenizer, produce text, apply stop strings (workers leave it to the router)
    engine: str = "real"  # "real", or "mock" / "mock:PROFILE" (a cost profile's path or shipped name)
    mock_kv_fraction: float = 1.0  # mock: share of the profiled KV bytes per token really stored and shipped

    @property
    def mock_profile(self) -> str | None:
        """The cost profile a mock engine runs on ("" = the default one); None for the real engine."""
        kind, _, profile = self.engine.partition(":")
        return profile if kind == "mock" else None

    def load_profile(self) -> CostProfile | None:
        if self.engine != "real" and self.mock_profile is None:
            raise ValueError(f"engine must be 'real', 'mock' or 'mock:PROFILE', got {self.engine!r}")
        return None if self.mock_profile is None else load_profile(self.mock_profile)

    def resolve(self, model: ModelConfig) -> "EngineConfig":
        """Validate the options against the model and fill in every 'auto'."""
        if not 0 < self.mock_kv_fraction <= 1:
            raise ValueError(f"mock_kv_fraction must be in (0, 1], got {self.mock_kv_fraction}")
        profile = self.load_profile()
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and profile is None else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        on_cuda = device.startswith("cuda")
        dtype = self.dtype
        if dtype == "auto" and profile is not None:
            dtype = profile.kv.dtype
        elif dtype == "auto":
            half = model.checkpoint_dtype in ("float16", "bfloat16")
            dtype = (model.checkpoint_dtype if half else "bfloat16") if on_cuda else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
        backend = self.attention_backend
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        cpu_kernel_fits = not on_cuda and dtype == "float32" and cpu_attention.supports(model.head_dim)
        if backend == "auto":
            backend = "triton" if on_cuda else "cpu" if cpu_kernel_fits and cpu_attention.compiler() else "torch"
        if backend == "cpu" and not cpu_kernel_fits:
            raise ValueError(f"attention_backend 'cpu' runs float32 on the CPU at a head_dim that is a multiple of 16 "
                             f"up to 256, not {dtype} on {device} at head_dim {model.head_dim}")  # fmt: skip
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        max_len = self.max_model_len or model.max_position_embeddings
        if not 1 < max_len <= model.max_position_embeddings:
            raise ValueError(
                f"max_model_len must be in [2, {model.max_position_embeddings}] for this model, got {max_len}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode in one step"
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        fraction = self.kv_cache_memory_fraction
        if fraction is None:
            fraction = 0.9 if on_cuda else 0.1
        if not 0 < fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction}")
        if not 0 < self.device_share <= 1:
            raise ValueError(f"device_share must be in (0, 1], got {self.device_share}")
        num_blocks = self.num_kv_blocks
        sized = (self.num_kv_blocks, self.kv_cache_gb, self.kv_cache_memory_fraction) != (None, None, None)
        if profile is not None and profile.kv_capacity_tokens and not sized:
            num_blocks = math.ceil(profile.kv_capacity_tokens / self.block_size)
        return dataclasses.replace(
            self,
            num_kv_blocks=num_blocks,
            device=device,
            dtype=dtype,
            attention_backend=backend,
            max_model_len=max_len,
            kv_cache_memory_fraction=fraction,
            # A long prompt takes at most a chunk per step, so other prompts progress between its chunks.
            chunk_size=min(self.chunk_size or DEFAULT_CHUNK_SIZE, self.max_num_batched_tokens),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def max_blocks_per_seq(self) -> int:
        assert self.max_model_len is not None, "resolve() first"
        return math.ceil(self.max_model_len / self.block_size)

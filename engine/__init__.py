"""One device's execution core: model, paged KV cache, scheduler, sampler, and the LLM API.

Knows nothing of Ray, gRPC or other workers.
"""

from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "ModelConfig", "RequestOutput", "SamplingParams"]

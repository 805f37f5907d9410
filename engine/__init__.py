"""One device's execution core: model, paged KV cache, scheduler, sampler, and the LLM API.

Knows nothing of Ray, gRPC or other workers.

The public names are loaded on first use (PEP 562), so the pure-Python parts (the block
allocator's hashing, the cost model) import without torch: the simulator and the planner
use them and must not pull torch in.
"""

import importlib

_EXPORTS = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "EngineConfig": "engine.config",
    "ModelConfig": "engine.config",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""The KV pool of one engine: a fixed number of blocks, sized from a memory budget.

Layout: one tensor [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim].
Layer i's cache is the pair of contiguous views kv[i, 0], kv[i, 1]; a block of layer i is
kv[i, :, block_id], which is what KV transfer gathers and scatters.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

from engine.config import EngineConfig, ModelConfig


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return model.num_layers * 2 * block_size * model.num_kv_heads * model.head_dim * itemsize


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def shared_device_budget(budget: int, total: int, held: int, fraction: float, share: float) -> int:
    """KV bytes for an engine that shares its GPU: engines packed on one card start together and
    each sees it all free, so each keeps to its share of the card (less what it already holds: its
    weights), as well as to `budget`."""
    return min(budget, int(total * share * fraction) - held)


def num_blocks_for(model: ModelConfig, config: EngineConfig, device: torch.device) -> int:
    """Blocks in the pool: num_kv_blocks if given, else what fits kv_cache_gb, else a fraction of
    free memory.
    Refuses a pool that cannot hold even one sequence of max_model_len tokens."""
    per_block = bytes_per_block(model, config.block_size, config.torch_dtype)
    if config.num_kv_blocks is not None:
        num_blocks, source = config.num_kv_blocks, f"num_kv_blocks={config.num_kv_blocks}"
    elif config.kv_cache_gb is not None:
        num_blocks, source = int(config.kv_cache_gb * 2**30) // per_block, f"kv_cache_gb={config.kv_cache_gb}"
    else:
        budget = int(free_memory_bytes(device) * config.kv_cache_memory_fraction)
        source = f"kv_cache_memory_fraction={config.kv_cache_memory_fraction} of free memory"
        if device.type == "cuda" and config.device_share < 1:
            total, held = torch.cuda.get_device_properties(device).total_memory, torch.cuda.memory_reserved(device)
            budget = shared_device_budget(budget, total, held, config.kv_cache_memory_fraction, config.device_share)
            source += f", within a {config.device_share:g} share of the GPU"
        num_blocks = max(0, budget) // per_block
    if num_blocks < config.max_blocks_per_seq:
        need_gb = config.max_blocks_per_seq * per_block / 2**30
        raise ValueError(
            f"KV cache too small: {source} gives {num_blocks} blocks of {config.block_size} tokens, but one "
            f"sequence of max_model_len={config.max_model_len} needs {config.max_blocks_per_seq} blocks "
            f"({need_gb:.3f} GiB); raise kv_cache_gb or lower max_model_len"
        )
    return num_blocks


class KVCache:
    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        shape = (model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # Zeroed, not empty: masked-out positions are multiplied by zero probabilities, and
        # uninitialized memory could hold NaN (0 * NaN = NaN).
        if device.type == "cpu":
            # An anonymous mapping: the kernel zero-fills its pages on first touch, so a multi-GiB
            # pool costs nothing at start-up (torch.zeros would write every page). Plain 4 KiB pages,
            # not numpy's zeros: numpy asks for transparent huge pages, whose first touch cost 2.5-3x
            # more per byte on the CPU VM, paid inside the steps that first write a block.
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self.kv = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)
        else:
            self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [(self.kv[i, 0], self.kv[i, 1]) for i in range(model.num_layers)]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

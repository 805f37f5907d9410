"""The CPU's C kernels in cpu_attention.c, built on first use: paged decode attention, the store
of a step's K/V into the pool, and the greedy argmax over a step's logits.

Built by the machine's C compiler ($CC, else `cc`) for the CPU it runs on (-march=native), into
a directory the caller names, under a name keyed by the source, the flags, the compiler's
version and the CPU's feature flags: the processes of one machine share one build, and a changed
source or another CPU gets its own. A build is written under a temporary name and renamed into
place, so workers starting together never load a half-written library. Building takes well
under a second.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_attention.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")


def compiler() -> str | None:
    """The C compiler's path, or None where the machine has none."""
    return shutil.which(os.environ.get("CC", "cc"))


def supports(head_dim: int) -> bool:
    """The kernel works in 16-float vectors, up to 16 of them per head (cpu_attention.c)."""
    return head_dim % 16 == 0 and head_dim <= 256


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


@functools.cache
def load(build_dir: Path) -> ctypes.CDLL:
    """The kernel library, built into build_dir if no build of this source for this CPU is there.
    Once per process and directory: every later engine reuses the loaded library."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("attention backend 'cpu' needs a C compiler ($CC or cc) to build kernels/cpu_attention.c; "
                           "install gcc or choose attention_backend='torch'")  # fmt: skip
    version = subprocess.run([cc, "--version"], capture_output=True, timeout=60).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version + _cpu_flags()).hexdigest()[:16]
    path = Path(build_dir) / f"cpu_attention-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            built = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300)
            if built.returncode:
                raise RuntimeError(f"building {SOURCE.name} with {cc} failed:\n{built.stderr}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    lib.decode_attention_f32.restype = ctypes.c_int
    lib.decode_attention_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + \
        [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]  # fmt: skip
    lib.store_kv_f32.restype = None
    lib.store_kv_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.argmax_f32.restype = None
    lib.argmax_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


def argmax(lib: ctypes.CDLL, logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, -1) of a [rows, cols] float32 CPU tensor (the first index of the
    largest value, or of the first NaN), in two vector passes per row instead of torch's one
    element at a time."""
    assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] > 0
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    lib.argmax_f32(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def store_kv(lib: ctypes.CDLL, key, value, k_cache, v_cache, slot_mapping) -> None:
    """reference.store_kv for float32 on the CPU: key/value [T, Hkv, D], each token's heads
    contiguous (rows may be strided); caches [N, block_size, Hkv, D] contiguous; slot_mapping [T] int64."""
    row = k_cache.shape[2] * k_cache.shape[3]
    for x in (key, value):
        assert x.dtype == torch.float32 and x.stride(2) == 1 and x.stride(1) == x.shape[2], "each token's K/V heads must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.dtype == torch.int64
    slot_mapping = slot_mapping.contiguous()
    lib.store_kv_f32(key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                     slot_mapping.data_ptr(), key.shape[0], row, torch.get_num_threads())  # fmt: skip


def decode_attention(lib: ctypes.CDLL, query, k_cache, v_cache, block_tables, seq_lens, scale: float) -> torch.Tensor:
    """One query token per sequence against its cached tokens: query [B, H, D] float32 on the CPU,
    caches [N, block_size, Hkv, D] (contiguous), block_tables [B, max_blocks] and seq_lens [B] int32.
    Returns [B, H, D]."""
    assert query.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and k_cache.is_contiguous() and v_cache.is_contiguous()
    query, block_tables, seq_lens = query.contiguous(), block_tables.contiguous(), seq_lens.contiguous()
    assert block_tables.dtype == seq_lens.dtype == torch.int32 and supports(query.shape[-1])
    out = torch.empty_like(query)
    batch, num_heads, head_dim = query.shape
    failed = lib.decode_attention_f32(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        seq_lens.data_ptr(), out.data_ptr(), batch, num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], scale,
        torch.get_num_threads(),  # torch's count, process-wide; OpenMP's own default is per thread (cpu_attention.c)
    )  # fmt: skip
    if failed:
        raise MemoryError(f"decode attention could not allocate score buffers for {failed} sequences")
    return out

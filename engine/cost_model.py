"""A cost profile: how long one engine step, one KV transfer and one worker start take, for one
model on one machine. Pure Python (no torch, no numpy): the mock runner, the planner and the
simulator all read it.

A profile is JSON, written by `pdserve profile` (source "measured") or by hand from published
figures (source "derived", with its sources and formula in `details`):

    prefill   seconds of a step computing `tokens` new prompt tokens of one sequence whose
              earlier `context` tokens are already in the KV cache      grid: tokens x context
    decode    seconds of a step decoding `batch` sequences of a mean length of `context`
              tokens each (the KV the step attends over, its new tokens included)
                                                                         grid: batch x context
    step_overhead_seconds   what every step pays whatever its size (on a GPU reading the weights
              once, on a CPU that plus launching the layers): a mixed step pays it once
    row_padding             true where the engine runs a step's rows padded up to
              engine.padding.padded_rows (a float32 CPU engine's packed linears: up to 1/8 more
              rows); the prefill cells were then measured at padded sizes, and a step with prompt
              chunks is priced at its padded row count. Absent: false
    transfer  per backend: fixed seconds per transfer + bytes / bytes_per_second
    kv        the profiled model's KV layout (layers, KV heads, head dim, dtype)
    kv_capacity_tokens      KV tokens one worker holds (a GPU's pool); null if not recorded
    startup_seconds         a worker from nothing to ready

Between grid points the times are piecewise-linear (bilinear in 2-D). Beyond the last point
each axis continues its last segment's slope (compute grows linearly with tokens), never
downwards; below the first point the first value holds (a step never costs less than the
smallest one measured).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.padding import padded_rows

FORMAT = 1
SOURCES = ("measured", "derived")
KV_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
PROFILES_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "profiles"  # the shipped profiles
DEFAULT_PROFILE = "smollm2-135m-cpu"
_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys); the first value below xs[0], the last segment's slope
    (if rising) above xs[-1]."""
    if x <= xs[0] or len(xs) == 1:
        return ys[0]
    i = min(bisect.bisect_right(xs, x), len(xs) - 1)  # the segment [xs[i-1], xs[i]]
    slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    if x > xs[-1]:
        return ys[-1] + max(slope, 0.0) * (x - xs[-1])
    return ys[i - 1] + slope * (x - xs[i - 1])


@dataclass(frozen=True)
class Grid:
    """Seconds measured at every point of two increasing axes: values[i][j] at (x[i], y[j])."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    values: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        for name, axis in (("x", self.x), ("y", self.y)):
            if not axis or any(b <= a for a, b in zip(axis, axis[1:])) or axis[0] < 0:
                raise ValueError(f"grid axis {name} must be non-empty, non-negative and increasing, got {list(axis)}")
        if len(self.values) != len(self.x) or any(len(row) != len(self.y) for row in self.values):
            raise ValueError(f"grid values must be {len(self.x)} rows of {len(self.y)}")
        if any(not (math.isfinite(v) and v >= 0) for row in self.values for v in row):
            raise ValueError("grid values must be finite seconds >= 0")

    def __call__(self, x: float, y: float) -> float:
        return _interp(self.x, [_interp(self.y, row, y) for row in self.values], x)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], x: str, y: str) -> "Grid":
        return cls(tuple(float(v) for v in d[x]), tuple(float(v) for v in d[y]),
                   tuple(tuple(float(v) for v in row) for row in d["seconds"]))  # fmt: skip

    def to_dict(self, x: str, y: str) -> dict:
        return {x: list(self.x), y: list(self.y), "seconds": [list(row) for row in self.values]}


@dataclass(frozen=True)
class Link:
    """One KV-transfer backend: a transfer of n bytes takes fixed_seconds + n / bytes_per_second."""

    fixed_seconds: float
    bytes_per_second: float

    def __post_init__(self) -> None:
        if not (self.fixed_seconds >= 0 and self.bytes_per_second > 0):
            raise ValueError(f"a transfer link needs fixed_seconds >= 0 and bytes_per_second > 0, got {self}")


@dataclass(frozen=True)
class KVSpec:
    """The profiled model's KV layout: what one token of KV costs to hold and to ship."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError(f"KV layout sizes must be >= 1, got {self}")
        if self.dtype not in KV_DTYPE_BYTES:
            raise ValueError(f"KV dtype must be one of {sorted(KV_DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * KV_DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class CostProfile:
    name: str
    source: str  # "measured" (pdserve profile) or "derived" (from published figures; see details)
    model: str  # e.g. "Llama-3.1-8B-Instruct"
    hardware: str  # e.g. "1x NVIDIA H100 SXM 80GB"
    kv: KVSpec
    prefill: Grid  # seconds by (new tokens, context tokens)
    decode: Grid  # seconds by (batch, mean context tokens per sequence)
    step_overhead_seconds: float
    startup_seconds: float
    transfer: Mapping[str, Link] = field(default_factory=dict)
    kv_capacity_tokens: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)  # provenance: machine, versions, load, sources, formula
    row_padding: bool = False  # the engine pads a step's rows (engine.padding); see the module docstring

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"profile source must be one of {SOURCES}, got {self.source!r}")
        if not (self.step_overhead_seconds >= 0 and self.startup_seconds >= 0):
            raise ValueError("step_overhead_seconds and startup_seconds must be >= 0")
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be >= 1 or null, got {self.kv_capacity_tokens}")

    # --- costs -----------------------------------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv.bytes_per_token

    def prefill_seconds(self, tokens: int, context: int = 0) -> float:
        """One step computing `tokens` new prompt tokens after `context` tokens already cached."""
        return self.prefill(tokens, context) if tokens > 0 else 0.0

    def decode_seconds(self, batch: int, context_tokens: int) -> float:
        """One decode step of `batch` sequences holding `context_tokens` tokens in total."""
        return self.decode(batch, context_tokens / batch) if batch > 0 else 0.0

    def step_seconds(self, prefill: Sequence[tuple[int, int]], decode_batch: int, decode_context_tokens: int) -> float:
        """A mixed step: prompt chunks (tokens, context) and a decode batch, as the colocated
        engine runs them. Each part is timed as if it ran alone; sharing one step, they pay the
        per-step overhead (counted in each part) once. Never less than its longest part.

        With row_padding, the rows the engine adds to the step's (prompt tokens plus decodes) are
        priced as more tokens of its largest chunk: a 100-token prompt runs as 104 rows, a
        137-token one as 144 (49 chat prompts replayed through one engine, three runs: unpadded
        prices 5.5-11.5% under its steps' CPU time, padded 1.6-7.5%; benchmarks/RESULTS.md). A step
        of decodes only is priced unpadded: its few rows cost little beside the weights it reads."""
        chunks = [(t, c) for t, c in prefill if t > 0]
        if self.row_padding and chunks:
            rows = sum(t for t, _ in chunks) + decode_batch
            largest = max(range(len(chunks)), key=lambda i: chunks[i][0])
            tokens, context = chunks[largest]
            chunks[largest] = (tokens + padded_rows(rows) - rows, context)
        parts = [self.prefill_seconds(t, c) for t, c in chunks]
        if decode_batch > 0:
            parts.append(self.decode_seconds(decode_batch, decode_context_tokens))
        if not parts:
            return 0.0
        return max(sum(parts) - (len(parts) - 1) * self.step_overhead_seconds, max(parts))

    def transfer_seconds(self, backend: str, nbytes: int) -> float:
        if backend not in self.transfer:
            raise KeyError(f"profile {self.name!r} has no transfer cost for backend {backend!r}; it has {sorted(self.transfer)}")
        link = self.transfer[backend]
        return link.fixed_seconds + nbytes / link.bytes_per_second

    # --- JSON ------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CostProfile":
        if d.get("format") != FORMAT:
            raise ValueError(f"unsupported cost profile format {d.get('format')!r} (this version reads {FORMAT})")
        try:
            kv = KVSpec(**d["kv"])
            if "kv_bytes_per_token" in d and d["kv_bytes_per_token"] != kv.bytes_per_token:
                raise ValueError(f"kv_bytes_per_token {d['kv_bytes_per_token']} does not match the KV layout ({kv.bytes_per_token})")
            return cls(
                name=str(d["name"]), source=d["source"], model=str(d["model"]), hardware=str(d["hardware"]), kv=kv,
                prefill=Grid.from_dict(d["prefill"], "tokens", "context"),
                decode=Grid.from_dict(d["decode"], "batch", "context"),
                step_overhead_seconds=float(d["step_overhead_seconds"]), startup_seconds=float(d["startup_seconds"]),
                transfer={k: Link(float(v["fixed_seconds"]), float(v["bytes_per_second"])) for k, v in d.get("transfer", {}).items()},
                kv_capacity_tokens=d.get("kv_capacity_tokens"), details=dict(d.get("details", {})),
                row_padding=_flag(d.get("row_padding", False), "row_padding"),
            )  # fmt: skip
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed cost profile: {type(e).__name__}: {e}") from None

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "name": self.name, "source": self.source, "model": self.model, "hardware": self.hardware,
            "kv": {"num_layers": self.kv.num_layers, "num_kv_heads": self.kv.num_kv_heads, "head_dim": self.kv.head_dim,
                   "dtype": self.kv.dtype},
            "kv_bytes_per_token": self.kv_bytes_per_token, "kv_capacity_tokens": self.kv_capacity_tokens,
            "startup_seconds": self.startup_seconds, "step_overhead_seconds": self.step_overhead_seconds,
            "row_padding": self.row_padding,
            "prefill": self.prefill.to_dict("tokens", "context"), "decode": self.decode.to_dict("batch", "context"),
            "transfer": {k: dataclasses.asdict(v) for k, v in self.transfer.items()},
            "details": dict(self.details),
        }  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> "CostProfile":
        with open(path) as f:
            try:
                return cls.from_dict(json.load(f))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2)
        text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)  # a row per line
        Path(path).write_text(text + "\n")


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def profile_path(spec: str | None) -> Path:
    """A profile file: `spec` itself if it is one, else the shipped profile of that name (the
    default one for None or "")."""
    spec = spec or DEFAULT_PROFILE
    if Path(spec).expanduser().is_file():
        return Path(spec).expanduser()
    shipped = PROFILES_DIR / f"{spec}.json"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
    raise FileNotFoundError(f"no cost profile {spec!r}: not a file, nor one of the shipped profiles {names}")


def load_profile(spec: str | None) -> CostProfile:
    return CostProfile.load(profile_path(spec))

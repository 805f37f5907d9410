"""Workloads for autoscaling experiments and the simulator: when requests arrive and how long
they are. The simulator (`pdserve sim`) and the real harness (`pdserve bench autoscale`) read the
same spec, so both see the same arrivals.

A workload is either a pattern or a trace:

  pattern   the arrival rate as a function of time, Poisson arrivals within it (thinning), and
            lengths drawn from per-workload distributions, all from one seed:
              constant  rate
              step      low, then high in [start, end), then low again
              ramp      low to high, linearly over the run
              spike     base, with a triangular spike to peak around `at`, `width` seconds wide
              diurnal   mean * (1 - amplitude * cos(2 pi t / period)): starts at the trough
  trace     a file: JSONL {"timestamp", "input_len", "output_len"} (optionally "prefix_id",
            "prefix_len"), or the CSV of the public Azure LLM inference traces
            (TIMESTAMP, ContextTokens, GeneratedTokens); dates are made relative to the first request

Two knobs apply to both: `time_scale` stretches the timeline (2 = everything takes twice as
long, at half the rate), `rate_scale` multiplies the rate (a trace's gaps shrink by it). A request
may share a prefix with others (`prefix_id`, `prefix_len` tokens): chat workloads share system
prompts, so prefix caches hit. `write_jsonl` freezes any workload into a trace file, so a run can
be replayed exactly.

Named workloads (the validation set): chat (short prompts, longer replies, shared system prompts),
interference (chat plus long documents with short answers), bursty (chat with two spikes).
Lengths are sized for the GPU profile; `rate_scale` / `time_scale` fit them to slower hardware.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

PATTERNS = ("constant", "step", "ramp", "spike", "diurnal")
ABSOLUTE = 1e8  # seconds: trace times past this are dates (epoch seconds), not offsets from the start


class Request(NamedTuple):
    time: float  # seconds after the start
    input_len: int
    output_len: int
    prefix_id: int = -1  # requests with the same id share their first prefix_len tokens; -1: none
    prefix_len: int = 0


@dataclass(frozen=True)
class Lengths:
    """Token counts: lognormal around `mean` (sigma in log space; 0 = always `mean`), clipped."""

    mean: float
    sigma: float = 0.0
    low: int = 1
    high: int = 1 << 20

    def draw(self, rng: random.Random) -> int:
        if self.sigma == 0:
            return max(self.low, min(self.high, round(self.mean)))
        mu = math.log(self.mean) - self.sigma**2 / 2  # so the mean is `mean` before clipping
        return max(self.low, min(self.high, round(rng.lognormvariate(mu, self.sigma))))


@dataclass(frozen=True)
class Mix:
    """One kind of request in a workload: its share, lengths and shared prefixes."""

    weight: float
    input: Lengths
    output: Lengths
    prefixes: int = 0  # distinct shared prefixes (system prompts) requests of this kind start with
    prefix_len: int = 0


@dataclass(frozen=True)
class Workload:
    """A pattern workload. `params` are the pattern's (rates in requests/s, times in seconds)."""

    pattern: str = "constant"
    duration: float = 60.0
    params: dict = field(default_factory=lambda: {"rate": 1.0})
    mix: tuple[Mix, ...] = (Mix(1.0, Lengths(256), Lengths(64)),)
    seed: int = 0
    time_scale: float = 1.0
    rate_scale: float = 1.0

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if not (self.duration > 0 and self.time_scale > 0 and self.rate_scale > 0):
            raise ValueError("duration, time_scale and rate_scale must be positive")
        if not self.mix or any(m.weight < 0 for m in self.mix) or sum(m.weight for m in self.mix) <= 0:
            raise ValueError("a workload needs at least one request kind with a positive weight")
        rate_fn(self.pattern, self.params)  # checks the parameters

    def rate(self, t: float) -> float:
        """Requests/s at time t (on the scaled timeline)."""
        return rate_fn(self.pattern, self.params)(t / self.time_scale) * self.rate_scale / self.time_scale

    @property
    def span(self) -> float:
        return self.duration * self.time_scale

    def peak_rate(self) -> float:
        """The highest rate over the span, sampled at 1,001 points."""
        return max(self.rate(self.span * i / 1000) for i in range(1001))

    def requests(self) -> Iterator[Request]:
        rng = random.Random(self.seed)
        peak = self.peak_rate()
        if peak <= 0:
            return
        weights = [m.weight for m in self.mix]
        t = 0.0
        while True:  # thinning: candidates at the peak rate, each kept with probability rate(t) / peak
            t += rng.expovariate(peak)
            if t >= self.span:
                return
            if rng.random() * peak > self.rate(t):
                continue
            kind = rng.choices(self.mix, weights)[0]
            prefix_id, prefix_len = -1, 0
            if kind.prefixes:
                prefix_id = self.mix.index(kind) * 1_000_000 + rng.randrange(kind.prefixes)
                prefix_len = kind.prefix_len
            input_len = max(kind.input.draw(rng), prefix_len + 1)
            yield Request(t, input_len, kind.output.draw(rng), prefix_id, prefix_len)

    def to_dict(self) -> dict:
        return {"type": "pattern", **dataclasses.asdict(self)}


def rate_fn(pattern: str, p: dict):
    """The unscaled rate function of a pattern; raises on missing or bad parameters."""
    try:
        if pattern == "constant":
            rate = float(p["rate"])
            return lambda t: rate
        if pattern == "step":
            low, high, start, end = float(p["low"]), float(p["high"]), float(p["start"]), float(p["end"])
            return lambda t: high if start <= t < end else low
        if pattern == "ramp":
            low, high, over = float(p["low"]), float(p["high"]), float(p["over"])
            return lambda t: low + (high - low) * min(1.0, t / over)
        if pattern == "spike":
            base, peak, at, width = float(p["base"]), float(p["peak"]), float(p["at"]), float(p["width"])
            return lambda t: base + (peak - base) * max(0.0, 1 - abs(t - at) / (width / 2))
        mean, amplitude, period = float(p["mean"]), float(p["amplitude"]), float(p["period"])
        if not 0 <= amplitude <= 1:
            raise ValueError("diurnal amplitude must be in [0, 1]")
        return lambda t: mean * (1 - amplitude * math.cos(2 * math.pi * t / period))
    except KeyError as e:
        raise ValueError(f"pattern {pattern!r} needs parameter {e.args[0]!r}") from None


@dataclass(frozen=True)
class Trace:
    """A trace file replayed with the same knobs as a pattern (and cut at `duration`, if given)."""

    path: str
    time_scale: float = 1.0
    rate_scale: float = 1.0
    duration: float | None = None

    def requests(self) -> Iterator[Request]:
        scale = self.time_scale / self.rate_scale
        for r in read_trace(self.path):
            t = r.time * scale
            if self.duration is not None and t >= self.duration:
                return
            yield r._replace(time=t)

    def to_dict(self) -> dict:
        return {"type": "trace", **dataclasses.asdict(self)}


# --- trace files -------------------------------------------------------------------------------


def read_trace(path: str) -> Iterator[Request]:
    """Requests of a JSONL or Azure CSV trace, in time order. Absolute times (dates, epoch seconds)
    are made relative to the first request; small numbers are seconds from the start already (a
    frozen workload replays exactly)."""
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        rows = _azure_rows(f) if first.lstrip().upper().startswith("TIMESTAMP") else _jsonl_rows(f, path)
        requests = sorted(rows)
    t0 = requests[0].time if requests and requests[0].time > ABSOLUTE else 0.0
    for r in requests:
        yield r._replace(time=r.time - t0)


def _jsonl_rows(f, path: str) -> Iterator[Request]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            yield Request(_seconds(d["timestamp"]), int(d["input_len"]), int(d["output_len"]),
                          int(d.get("prefix_id", -1)), int(d.get("prefix_len", 0)))  # fmt: skip
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a trace line ({type(e).__name__}: {e})") from None


def _azure_rows(f) -> Iterator[Request]:
    for row in csv.DictReader(f):
        row = {k.strip(): v for k, v in row.items()}
        yield Request(_seconds(row["TIMESTAMP"]), int(row["ContextTokens"]), max(1, int(row["GeneratedTokens"])))


def _seconds(stamp) -> float:
    """Seconds from a number or a date-time string (Azure's carry 7 fractional digits)."""
    if isinstance(stamp, (int, float)):
        return float(stamp)
    try:
        return float(stamp)
    except ValueError:
        pass
    whole, _, fraction = stamp.strip().partition(".")
    return datetime.fromisoformat(whole).timestamp() + (float("0." + fraction) if fraction else 0.0)


def write_jsonl(requests, path: str) -> int:
    """Freeze requests into a JSONL trace (replays exactly); returns how many were written."""
    n = 0
    with open(path, "w") as f:
        for r in requests:
            line = {"timestamp": round(r.time, 9), "input_len": r.input_len, "output_len": r.output_len}
            if r.prefix_id >= 0:
                line.update(prefix_id=r.prefix_id, prefix_len=r.prefix_len)
            f.write(json.dumps(line) + "\n")
            n += 1
    return n


# --- named workloads -----------------------------------------------------------------------------

_CHAT = Mix(1.0, Lengths(600, 0.6, 32, 4096), Lengths(200, 0.8, 8, 1024), prefixes=8, prefix_len=256)
_DOCUMENT = Mix(0.2, Lengths(6000, 0.3, 2048, 12000), Lengths(48, 0.5, 4, 256))
NAMED = {
    "chat": Workload("constant", 120.0, {"rate": 40.0}, (_CHAT,)),
    "interference": Workload("constant", 120.0, {"rate": 20.0}, (_CHAT, _DOCUMENT)),
    "bursty": Workload("spike", 120.0, {"base": 15.0, "peak": 90.0, "at": 60.0, "width": 20.0}, (_CHAT,)),
    "diurnal": Workload("diurnal", 1200.0, {"mean": 40.0, "amplitude": 0.8, "period": 1200.0}, (_CHAT,)),
}


def named(name: str, **changes) -> Workload:
    """A named workload, with fields replaced (seed, duration, time_scale, rate_scale, params...)."""
    if name not in NAMED:
        raise ValueError(f"no workload {name!r}; named workloads: {', '.join(NAMED)}")
    return dataclasses.replace(NAMED[name], **{k: v for k, v in changes.items() if v is not None})


def from_dict(d: dict) -> Workload | Trace:
    """The inverse of `to_dict` (as a run report records its workload)."""
    d = dict(d)
    kind = d.pop("type")
    if kind == "trace":
        return Trace(**d)
    d["mix"] = tuple(Mix(m["weight"], Lengths(**m["input"]), Lengths(**m["output"]), m.get("prefixes", 0), m.get("prefix_len", 0))
                     for m in d["mix"])  # fmt: skip
    return Workload(**d)

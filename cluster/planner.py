"""The autoscaling planner: how many workers each pool should have, and why.

Pure Python (no Ray, gRPC, asyncio or torch), so the real cluster and the simulator run this very
object. One decision is four steps, the last of which is not here:

  observe   the caller builds an Observation every `interval` seconds: per pool, its workers
            (state, queued prompt tokens, running/waiting sequences, KV blocks, busy time,
            refused reservations over the window), and the router's window (TTFT and ITL
            percentiles, arrivals, mean input/output lengths, requests finished)
  predict   (predictive policy) arrival rate and lengths a horizon ahead; the ratio of observed
            to modelled latency, which corrects the cost profile
  decide    `Planner.decide(observation, now)`: a policy proposes a size per pool with a reason,
            then one governor applies what both policies share: bounds, a bounded step, cooldowns,
            no growth on stale signals, and shrinking only after the wish held for a whole
            cooldown (sized by the largest wish over it)
  actuate   the caller resizes the pools that change (`decision.changes`) to their targets
            (counting starting and ready workers, not draining ones); removed workers drain, so
            no in-flight work is lost

Policies:
  slo         reactive. Prefill grows on TTFT over its SLO while the prefill pool is loaded, or on a
              backlog that cannot be computed within the TTFT SLO at the measured prefill rate.
              Decode grows on ITL over its SLO, KV usage or batch slots over the high-water mark,
              refused reservations, or requests the router refused or holds waiting for room. A prompt-heavy load raises TTFT and backlog; a decode-heavy one ITL
              and KV usage: each pool answers its own signals. A pool shrinks to the fewest
              workers its load fits in under the utilisation low-water mark (prefill: busy time;
              decode: KV usage or batch slots, whichever is fuller, and ITL below `slo_headroom` of its SLO with its sequences spread
              over fewer workers), and only while both SLOs hold.
  predictive  Dynamo's throughput planner: predicted load / per-worker capacity at the SLOs (from a
              cost profile, see `capacity_from_profile`), rounded up; the SLOs the capacity is
              computed at are divided by the observed/modelled latency ratio. It shrinks only to
              a size whose load stays under `slo_headroom` of its capacity, at the rate predicted
              a horizon ahead and at the last window's (a shrink takes effect at once).

Reason codes (`PoolDecision.reason`, a metrics label; `detail` holds the numbers):
  up    min, ttft, backlog, itl, kv, batch, refused, queue, load
  down  max, idle, load
  hold  steady, elsewhere (an SLO missed, not for lack of this pool's workers), starting, cooldown,
        stabilizing, at_max, no_data
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field

ROLES = ("prefill", "decode", "colocated")
STARTING, READY, DRAINING, DEAD = "starting", "ready", "draining", "dead"
PERCENTILES = (50, 90, 99)

# --- observation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerObservation:
    """One worker, over the last window (the counters are differences between two polls)."""

    id: str
    state: str  # starting | ready | draining | dead
    queued_tokens: int = 0  # prompt tokens handed to it and not yet computed (prefill, colocated)
    running: int = 0  # sequences in its running batch
    waiting: int = 0  # sequences queued or reserved, not running yet
    kv_used_blocks: int = 0  # held by live requests, reservations included
    kv_total_blocks: int = 0
    busy_seconds: float = 0.0  # time its engine spent in steps during the window
    prompt_tokens: int = 0  # prompt tokens it computed during the window
    refused: int = 0  # reservations it refused during the window (decode)
    max_seqs: int = 0  # the most sequences it runs at once (decode, colocated; 0: not known)
    reported: bool = True  # False: its stats did not come this round (a busy worker's call timed out), its load is unknown


@dataclass(frozen=True)
class PoolObservation:
    workers: tuple[WorkerObservation, ...] = ()

    def count(self, *states: str) -> int:
        return sum(w.state in states for w in self.workers)

    @property
    def live(self) -> int:
        """Workers that are or will be taking work: what a target counts."""
        return self.count(STARTING, READY)

    @property
    def ready(self) -> tuple[WorkerObservation, ...]:
        return tuple(w for w in self.workers if w.state == READY)

    @property
    def reporting(self) -> tuple[WorkerObservation, ...]:
        """The ready workers whose load is known: usage is a share of theirs (one that did not
        report is not taken for idle)."""
        return tuple(w for w in self.ready if w.reported)

    @property
    def queued_tokens(self) -> int:
        return sum(w.queued_tokens for w in self.ready)  # the router's count: known for every worker

    @property
    def kv_usage(self) -> float:
        total = sum(w.kv_total_blocks for w in self.reporting)
        return sum(w.kv_used_blocks for w in self.reporting) / total if total else 0.0

    @property
    def seq_usage(self) -> float:
        """Sequences held (running, or waiting with their blocks reserved) per batch slot of the
        ready workers: past 1 the batches are full and sequences wait for a slot."""
        known = [w for w in self.reporting if w.max_seqs]
        slots = sum(w.max_seqs for w in known)
        return sum(w.running + w.waiting for w in known) / slots if slots else 0.0

    @property
    def usage(self) -> float:
        """What a decode pool runs out of first: KV blocks or batch slots."""
        return max(self.kv_usage, self.seq_usage)

    def busy(self, duration: float) -> float:
        """Share of the window the ready workers spent computing."""
        ready = self.reporting  # (one silent last round reports two windows' busy time now)
        return sum(min(w.busy_seconds, duration) for w in ready) / (len(ready) * duration) if ready else 0.0

    def total(self, attribute: str) -> float:
        return sum(getattr(w, attribute) for w in self.workers if w.state != DEAD)


@dataclass(frozen=True)
class Percentiles:
    """Latency percentiles in milliseconds; None where the window had no sample."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    def at(self, q: int) -> float | None:
        return getattr(self, f"p{q}")


@dataclass(frozen=True)
class Window:
    """What the router saw over the last `duration` seconds."""

    duration: float
    arrivals: int = 0  # requests that came in (admitted or not)
    finished: int = 0
    mean_input_len: float | None = None  # over the arrivals
    mean_output_len: float | None = None  # over the finished requests
    ttft_ms: Percentiles = field(default_factory=Percentiles)
    itl_ms: Percentiles = field(default_factory=Percentiles)
    refused: int = 0  # requests the router turned away for want of KV room (RESOURCE_EXHAUSTED)
    admission_queue: int = 0  # requests waiting for KV room when the window closed

    def __post_init__(self):
        if not self.duration > 0:
            raise ValueError(f"a window lasts a positive time, got {self.duration}")

    @property
    def rate(self) -> float:
        return self.arrivals / self.duration


@dataclass(frozen=True)
class Observation:
    window: Window
    pools: dict[str, PoolObservation]  # by role: prefill and decode, or colocated
    block_size: int = 16  # tokens per KV block


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannerConfig:
    policy: str = "slo"  # "slo" (reactive) or "predictive"
    min_prefill: int = 1
    max_prefill: int = 8
    min_decode: int = 1
    max_decode: int = 8
    min_colocated: int = 1
    max_colocated: int = 8
    slo_ttft_ms: float = 1000.0
    slo_itl_ms: float = 100.0
    percentile: int = 90  # the SLOs bind this percentile of the window: 50, 90 or 99
    interval: float = 10.0  # seconds between decisions: the router's window
    up_cooldown: float = 20.0  # seconds after a pool's last change before it grows again
    down_cooldown: float = 60.0  # ... before it shrinks again; also how long a shrink must be wished
    max_step: int = 2  # most workers added to or removed from a pool in one decision
    kv_high: float = 0.85  # decode KV usage that grows the pool
    util_low: float = 0.3  # utilisation a pool may shrink to (prefill busy time, decode KV usage)
    slo_headroom: float = 0.8  # a shrink keeps a pool's latency (slo) or predicted load (predictive) under this share
    predictor: str = "holt"  # "holt" (linear trend) or "moving_average"
    horizon: float = 30.0  # seconds ahead the predictive policy sizes for (about a worker's start-up)
    history: int = 6  # windows the moving average spans
    holt_alpha: float = 0.5  # level smoothing
    holt_beta: float = 0.3  # trend smoothing
    max_correction: float = 2.0  # observed/modelled latency ratio is clamped to [1/this, this]
    prefill_max_tokens: int = 2048  # a prefill step's token budget (the engine's max_num_batched_tokens)
    decode_max_batch: int = 256  # sequences in a decode step (the engine's max_num_seqs)

    def __post_init__(self):
        problems = []
        if self.policy not in ("slo", "predictive"):
            problems.append(f"policy must be slo or predictive, got {self.policy!r}")
        if self.predictor not in ("holt", "moving_average"):
            problems.append(f"predictor must be holt or moving_average, got {self.predictor!r}")
        if self.percentile not in PERCENTILES:
            problems.append(f"percentile must be one of {PERCENTILES}, got {self.percentile}")
        for role in ROLES:
            lo, hi = self.bounds(role)
            if not 1 <= lo <= hi:
                problems.append(f"{role} bounds need 1 <= min <= max, got min {lo}, max {hi}")
        positive = ("slo_ttft_ms", "slo_itl_ms", "interval", "horizon", "prefill_max_tokens", "decode_max_batch", "max_step",
                    "history")  # fmt: skip
        problems += [f"{name} must be positive" for name in positive if not getattr(self, name) > 0]
        problems += [f"{name} cannot be negative" for name in ("up_cooldown", "down_cooldown") if getattr(self, name) < 0]
        fractions = ("kv_high", "util_low", "slo_headroom", "holt_alpha", "holt_beta")
        problems += [f"{name} must be in (0, 1]" for name in fractions if not 0 < getattr(self, name) <= 1]
        if self.util_low >= self.kv_high:
            problems.append("util_low must be below kv_high (the band between them is the hysteresis)")
        if self.max_correction < 1:
            problems.append("max_correction must be at least 1")
        if problems:
            raise ValueError("bad planner configuration: " + "; ".join(problems))

    def bounds(self, role: str) -> tuple[int, int]:
        return getattr(self, f"min_{role}"), getattr(self, f"max_{role}")


def parse_options(items: list[str]) -> dict:
    """`NAME=VALUE` strings (the CLIs' --planner-option) as PlannerConfig fields of their types."""
    types = {f.name: type(f.default) for f in dataclasses.fields(PlannerConfig)}
    options = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types or not value:
            raise ValueError(f"--planner-option takes NAME=VALUE with NAME one of {', '.join(types)}; got {item!r}")
        try:
            options[name] = types[name](value)
        except ValueError:
            raise ValueError(f"--planner-option {name}={value}: expected {types[name].__name__}") from None
    return options


# --- decision ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolDecision:
    role: str
    current: int  # live workers (starting + ready)
    target: int
    direction: str  # up | down | hold
    reason: str  # a code from the module docstring
    detail: str  # the numbers behind it


@dataclass(frozen=True)
class Decision:
    at: float
    pools: tuple[PoolDecision, ...]

    @property
    def targets(self) -> dict[str, int]:
        return {p.role: p.target for p in self.pools}

    @property
    def changes(self) -> list[PoolDecision]:
        return [p for p in self.pools if p.direction != "hold"]


# --- prediction ----------------------------------------------------------------------------------


class MovingAverage:
    def __init__(self, config: PlannerConfig):
        self.values: deque[float] = deque(maxlen=config.history)

    def add(self, x: float) -> None:
        self.values.append(x)

    def forecast(self, steps: float) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None


class Holt:
    """Holt's linear trend: a smoothed level and slope, extrapolated `steps` windows ahead."""

    def __init__(self, config: PlannerConfig):
        self.alpha, self.beta = config.holt_alpha, config.holt_beta
        self.level: float | None = None
        self.trend = 0.0

    def add(self, x: float) -> None:
        if self.level is None:
            self.level = x
            return
        previous = self.level
        self.level = self.alpha * x + (1 - self.alpha) * (self.level + self.trend)
        self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.trend
        if self.level <= 0:  # a rate is never negative: a fall to zero ends there, not in a trend that
            self.level, self.trend = 0.0, 0.0  # would under-forecast the load's return for windows

    def forecast(self, steps: float) -> float | None:
        return None if self.level is None else max(0.0, self.level + steps * self.trend)


PREDICTORS = {"holt": Holt, "moving_average": MovingAverage}

# --- capacity from a cost profile -------------------------------------------------------------
#
# The profile answers profile.prefill_seconds(tokens, context=0) and profile.decode_seconds(batch,
# context_tokens) (engine/cost_model.py's CostProfile; any object with these two works).
#
# Prefill: a loaded worker runs steps back to back, each taking the prompts that arrived during
# the one before (k whole prompts of `isl` tokens, up to the step budget; a longer prompt is cut
# into `steps` budget-sized chunks). A prompt waits for the step in flight, then is computed:
# TTFT = (steps + u) * t(step), u the share of time the worker is busy. Capacity is the largest
# k*isl / t(k*isl) whose TTFT at u = 1 meets the target; below that, the u at which one-prompt
# steps meet it.
# Decode: every running sequence emits a token per step; capacity is b / d(b) for the largest
# batch b whose step, at the mean context isl + osl/2, meets the ITL target (and whose KV fits).


@dataclass(frozen=True)
class Capacity:
    prefill_tokens_per_s: float  # prompt tokens/s one worker sustains within the TTFT target
    prefill_step_tokens: int  # the step size that gets it
    decode_tokens_per_s: float  # output tokens/s one worker sustains within the ITL target
    decode_batch: int  # the batch that gets it
    ttft_reachable: bool  # False: even an idle worker misses the TTFT target (capacity = keeping up)
    itl_reachable: bool  # False: even a batch of one misses the ITL target


def capacity_from_profile(
    profile, config: PlannerConfig, input_len: float, output_len: float, kv_tokens: int | None = None,
    ttft_ms: float | None = None, itl_ms: float | None = None,
) -> Capacity:  # fmt: skip
    """Per-worker capacities for requests of these mean lengths, at the SLOs (or the given
    targets); kv_tokens bounds a decode batch to what fits under the KV high-water mark."""
    ttft = (ttft_ms or config.slo_ttft_ms) / 1000
    itl = (itl_ms or config.slo_itl_ms) / 1000
    prefill, step, ttft_ok = _prefill_capacity(profile, input_len, config.prefill_max_tokens, ttft)
    context = input_len + output_len / 2
    max_batch = config.decode_max_batch
    if kv_tokens:
        max_batch = max(1, min(max_batch, int(config.kv_high * kv_tokens / context)))
    step_seconds = lambda b: profile.decode_seconds(b, round(b * context))  # noqa: E731
    batch = _largest(1, max_batch, lambda b: step_seconds(b) <= itl)
    b = batch or 1
    return Capacity(prefill, step, b / step_seconds(b), b, ttft_ok, batch is not None)


def predicted_ttft_ms(profile, input_len: float, budget: int, tokens_per_s: float) -> float | None:
    """The TTFT the prefill model expects of a worker computing `tokens_per_s` prompt tokens;
    None past what it can compute (a queue without bound)."""
    unit, steps = _prefill_unit(input_len, budget)
    t1 = profile.prefill_seconds(unit)
    busy = tokens_per_s * t1 / unit
    if busy <= 1:
        return (steps + busy) * t1 * 1000
    k = _smallest(1, budget // unit, lambda k: k * unit / profile.prefill_seconds(k * unit) >= tokens_per_s)
    return None if k is None else (steps + 1) * profile.prefill_seconds(k * unit) * 1000


def _prefill_unit(input_len: float, budget: int) -> tuple[int, int]:
    """The smallest step a prompt rides in, and how many such steps it needs."""
    isl = max(1, round(input_len))
    return (isl, 1) if isl < budget else (budget, math.ceil(isl / budget))


def _prefill_capacity(profile, input_len: float, budget: int, ttft: float) -> tuple[float, int, bool]:
    unit, steps = _prefill_unit(input_len, budget)
    k = _largest(1, budget // unit, lambda k: (steps + 1) * profile.prefill_seconds(k * unit) <= ttft)
    if k is not None:
        return k * unit / profile.prefill_seconds(k * unit), k * unit, True
    t1 = profile.prefill_seconds(unit)
    busy = ttft / t1 - steps
    return (busy if busy > 0 else 1.0) * unit / t1, unit, busy > 0


def _largest(lo: int, hi: int, ok) -> int | None:
    """The largest n in [lo, hi] with ok(n), for ok true up to some n and false after."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _smallest(lo: int, hi: int, ok) -> int | None:
    """The smallest n in [lo, hi] with ok(n), for ok false up to some n and true after."""
    if hi < lo or not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


# --- the planner ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wish:
    size: int
    reason: str
    detail: str


class Planner:
    """Decides target pool sizes; keeps what it needs between decisions (predictors, corrections,
    the last measured prefill rate, when each pool last changed and since when it wants to shrink).
    The same sequence of (observation, now) gives the same decisions. Between decisions the caller
    may replace `config` with one that differs in bounds, SLOs or cooldowns (say, after a manual
    `pdserve scale`), not in policy or predictor."""

    def __init__(self, config: PlannerConfig, profile=None):
        if config.policy == "predictive" and profile is None:
            raise ValueError("the predictive policy needs a cost profile (pdserve profile writes one)")
        self.config = config
        self.profile = profile
        self._last_change: dict[str, float] = {}
        self._shrink: dict[str, tuple[float, int]] = {}  # role -> (wished since, largest wish since)
        self._last_starting: dict[str, float] = {}  # role -> when it last had workers starting
        self._prefill_rate: dict[str, float] = {}  # role -> prompt tokens/s of one busy worker
        predictor = PREDICTORS[config.predictor]
        self._rate, self._input_len, self._output_len = predictor(config), predictor(config), predictor(config)
        self._correction = {"ttft": 1.0, "itl": 1.0}

    def decide(self, observation: Observation, now: float) -> Decision:
        self._observe(observation)
        pools = []
        policy = self._slo if self.config.policy == "slo" else self._predictive
        for role in ROLES:
            if role in observation.pools:
                pool = observation.pools[role]
                pools.append(self._govern(role, pool, policy(role, pool, observation), now, observation.window.duration))
        return Decision(now, tuple(pools))

    # --- observe and predict -------------------------------------------------------------------

    def _observe(self, obs: Observation) -> None:
        w = obs.window
        for role in ("prefill", "colocated"):
            pool = obs.pools.get(role)
            if pool is not None and pool.total("busy_seconds") > 0 and pool.total("prompt_tokens") > 0:
                self._prefill_rate[role] = pool.total("prompt_tokens") / pool.total("busy_seconds")
        if self.config.policy != "predictive":
            return
        self._rate.add(w.rate)
        if w.mean_input_len is not None:
            self._input_len.add(w.mean_input_len)
        if w.mean_output_len is not None:
            self._output_len.add(w.mean_output_len)
        self._correct(obs)

    def _correct(self, obs: Observation) -> None:
        """Observed over modelled latency, at the load the window actually had."""
        w, c, q = obs.window, self.config, self.config.percentile
        prefill = obs.pools.get("prefill") or obs.pools.get("colocated")
        decode = obs.pools.get("decode") or obs.pools.get("colocated")
        ttft, itl = w.ttft_ms.at(q), w.itl_ms.at(q)
        if ttft is not None and w.mean_input_len and prefill is not None and prefill.ready:
            per_worker = w.rate * w.mean_input_len / len(prefill.ready)
            modelled = predicted_ttft_ms(self.profile, w.mean_input_len, c.prefill_max_tokens, per_worker)
            if modelled:
                self._correction["ttft"] = self._clamp(ttft / modelled)
        if itl is not None and w.mean_input_len and w.mean_output_len and decode is not None and decode.reporting:
            batch = max(1, round(sum(w.running for w in decode.reporting) / len(decode.reporting)))  # draining workers' batches are not theirs
            context = w.mean_input_len + w.mean_output_len / 2
            modelled = self.profile.decode_seconds(batch, round(batch * context)) * 1000
            if modelled:
                self._correction["itl"] = self._clamp(itl / modelled)

    def _clamp(self, ratio: float) -> float:
        m = self.config.max_correction
        return min(m, max(1 / m, ratio))

    # --- the slo policy --------------------------------------------------------------------------

    def _slo(self, role: str, pool: PoolObservation, obs: Observation) -> _Wish:
        c, w, n = self.config, obs.window, pool.live
        ttft, itl = w.ttft_ms.at(c.percentile), w.itl_ms.at(c.percentile)
        summary = self._summary(role, pool, w, ttft, itl)
        grow = self._growth(role, pool, w, ttft, itl)
        if grow:
            why = ", ".join(why for *_, why in grow)
            size, reason, _ = max(grow, key=lambda g: g[0])  # the reason is the signal that sized it
            return _Wish(max(n + 1, size), reason, f"{why} ({summary})")
        if _over(ttft, c.slo_ttft_ms) or _over(itl, c.slo_itl_ms):
            return _Wish(n, "elsewhere", f"an SLO is missed, not for lack of {role} workers ({summary})")
        if pool.ready and not pool.reporting:  # their load unknown: not taken for idle
            return _Wish(n, "no_data", f"no ready {role} worker reported its load ({summary})")
        size = self._fits(role, pool, w, ttft, itl)
        if size < n:
            return _Wish(size, "idle", f"SLOs held, the load fits in {size} ({summary})")
        return _Wish(n, "steady", f"SLOs held ({summary})")

    def _growth(self, role: str, pool: PoolObservation, w: Window, ttft: float | None, itl: float | None) -> list:
        """(size wished, reason, why) for every signal that asks this pool to grow."""
        c, n = self.config, pool.live
        grow = []
        if role != "decode":
            backlog, rate, budget = pool.queued_tokens, self._prefill_rate.get(role), c.slo_ttft_ms / 1000
            seconds = backlog / (max(1, len(pool.ready)) * rate) if rate else 0.0  # to compute it at the measured rate
            if seconds > budget:
                why = f"backlog needs {seconds:.2f} s at {rate:.0f} tokens/s per worker"
                grow.append((math.ceil(backlog / (rate * budget)), "backlog", why))
            # A TTFT missed while the prefill pool idles is spent elsewhere (waiting for decode KV room).
            loaded = backlog or not pool.reporting or pool.busy(w.duration) >= c.util_low  # (not known: trusted)
            if _over(ttft, c.slo_ttft_ms) and (role == "colocated" or loaded):
                grow.append((math.ceil(n * ttft / c.slo_ttft_ms), "ttft", "TTFT over SLO"))
        if role != "prefill":
            if _over(itl, c.slo_itl_ms):
                grow.append((math.ceil(n * itl / c.slo_itl_ms), "itl", "ITL over SLO"))
            if pool.kv_usage > c.kv_high:
                grow.append((math.ceil(n * pool.kv_usage / c.kv_high), "kv", f"KV usage over {c.kv_high:.0%}"))
            if pool.seq_usage > c.kv_high:
                grow.append((math.ceil(n * pool.seq_usage / c.kv_high), "batch", f"batch slots over {c.kv_high:.0%} full"))
            # Admission waits on this pool's room: requests refused or queued for it say it is short,
            # the queue by as many workers again as hold what it holds now.
            if pool.total("refused") or w.refused:
                grow.append((n + 1, "refused", f"reservations refused ({pool.total('refused'):.0f} by workers, {w.refused} by the router)"))
            if w.admission_queue:
                held = pool.total("running") + pool.total("waiting")
                size = math.ceil(n * (held + w.admission_queue) / held) if held else n + 1
                grow.append((size, "queue", f"{w.admission_queue} requests wait for room"))
        return grow

    def _fits(self, role: str, pool: PoolObservation, w: Window, ttft: float | None, itl: float | None) -> int:
        """The fewest workers this pool's load fits in: prefill under the low-water mark of busy
        time; decode under it in KV usage, and its ITL under slo_headroom of the SLO with the same
        sequences spread over fewer workers (a decode step is affine in its batch, so the ITL grows
        at most in proportion)."""
        c, n = self.config, pool.live
        fits = [1]
        if role == "prefill":
            fits.append(_ceil(n * pool.busy(w.duration) / c.util_low))
        if role != "prefill":
            fits.append(_ceil(n * pool.usage / c.util_low))
            if itl is not None:
                fits.append(_ceil(n * itl / (c.slo_headroom * c.slo_itl_ms)))
        if role == "colocated" and ttft is not None:  # busy time says little where decodes keep it busy
            fits.append(_ceil(n * ttft / (c.slo_headroom * c.slo_ttft_ms)))
        return max(fits)

    def _summary(self, role: str, pool: PoolObservation, w: Window, ttft: float | None, itl: float | None) -> str:
        c, p = self.config, f"p{self.config.percentile}"
        parts = []
        if role != "decode":
            parts.append(f"TTFT {p} {_ms(ttft)} / SLO {c.slo_ttft_ms:.0f} ms, busy {pool.busy(w.duration):.0%}, "
                         f"backlog {pool.queued_tokens} tokens")  # fmt: skip
        if role != "prefill":
            running, waiting, refused = (f"{pool.total(name):.0f}" for name in ("running", "waiting", "refused"))
            parts.append(f"ITL {p} {_ms(itl)} / SLO {c.slo_itl_ms:.0f} ms, KV {pool.kv_usage:.0%}, batch {pool.seq_usage:.0%}, "
                         f"running {running}, waiting {waiting}, refused {refused}")  # fmt: skip
        return "; ".join(parts)

    # --- the predictive policy -------------------------------------------------------------------

    def _predictive(self, role: str, pool: PoolObservation, obs: Observation) -> _Wish:
        c, w = self.config, obs.window
        steps = c.horizon / w.duration
        rate, isl, osl = (p.forecast(steps) for p in (self._rate, self._input_len, self._output_len))
        if rate == 0 and w.rate == 0:
            return _Wish(1, "load", "no load predicted")
        if rate is None or isl is None or (osl is None and role != "prefill"):  # prefill is sized without output lengths
            return _Wish(pool.live, "no_data", "no request lengths seen yet")
        isl, osl = max(1.0, isl), max(1.0, osl or 1.0)
        decode = obs.pools.get("decode") or pool
        kv_blocks = [worker.kv_total_blocks for worker in decode.ready if worker.kv_total_blocks]
        kv_tokens = min(kv_blocks) * obs.block_size if kv_blocks else None
        ttft_target, itl_target = c.slo_ttft_ms / self._correction["ttft"], c.slo_itl_ms / self._correction["itl"]
        cap = capacity_from_profile(self.profile, c, isl, osl, kv_tokens, ttft_target, itl_target)

        def workers_for(rate: float) -> float:
            prefill, decoding = rate * isl / cap.prefill_tokens_per_s, rate * osl / cap.decode_tokens_per_s
            return {"prefill": prefill, "decode": decoding, "colocated": prefill + decoding}[role]

        needed = workers_for(rate)
        parts = [f"predicted {rate:.2f} req/s x {isl:.0f} in / {osl:.0f} out {c.horizon:.0f} s ahead "
                 f"(last window: {w.rate:.2f} req/s in, {w.finished} finished)"]  # fmt: skip
        if role != "decode":
            parts.append(f"{cap.prefill_tokens_per_s:.0f} prompt tokens/s per worker at TTFT {ttft_target:.0f} ms"
                         + ("" if cap.ttft_reachable else " (out of reach: sized to keep up)"))  # fmt: skip
        if role != "prefill":
            parts.append(f"{cap.decode_tokens_per_s:.0f} output tokens/s per worker (batch {cap.decode_batch}) "
                         f"at ITL {itl_target:.0f} ms" + ("" if cap.itl_reachable else " (out of reach)"))  # fmt: skip
        parts.append(f"needs {needed:.2f} workers")
        size = max(1, _ceil(needed))
        if size < pool.live:
            # The horizon is for growth (new workers take that long to start); a shrink takes effect at
            # once, so it is sized for the load now as well (a trend that runs past zero must not
            # empty a pool still serving), and, as hysteresis, with headroom.
            now = max(needed, workers_for(w.rate))
            size = min(pool.live, max(1, _ceil(now / c.slo_headroom)))
            parts.append(f"{now / c.slo_headroom:.2f} with {1 - c.slo_headroom:.0%} headroom"
                         + (" at the last window's rate" if now > needed else ""))  # fmt: skip
        return _Wish(size, "load", ", ".join(parts))

    # --- what both policies share ----------------------------------------------------------------

    def _govern(self, role: str, pool: PoolObservation, wish: _Wish, now: float, window: float) -> PoolDecision:
        c = self.config
        lo, hi = c.bounds(role)
        current, starting = pool.live, pool.count(STARTING)
        if starting:
            self._last_starting[role] = now
        since_change = now - self._last_change.get(role, -math.inf)

        def result(target: int, reason: str, detail: str) -> PoolDecision:
            direction = "up" if target > current else "down" if target < current else "hold"
            if direction != "hold":
                self._last_change[role] = now
                self._shrink.pop(role, None)
            return PoolDecision(role, current, target, direction, reason, detail)

        if current < lo:
            return result(lo, "min", f"below the minimum {lo}")
        if current > hi:
            return result(hi, "max", f"above the maximum {hi}")
        size = min(hi, max(lo, wish.size))
        if size > current:
            self._shrink.pop(role, None)
            # Reactive growth waits for a whole window that shows the workers started before.
            if c.policy == "slo" and now - self._last_starting.get(role, -math.inf) <= window:
                return result(current, "starting", f"{starting} starting; {wish.detail}" if starting else
                              f"waiting for a window with the new workers; {wish.detail}")  # fmt: skip
            if since_change < c.up_cooldown:
                return result(current, "cooldown", f"changed {since_change:.0f} s ago; {wish.detail}")
            return result(min(size, current + c.max_step), wish.reason, wish.detail)
        if size < current:
            since, largest = self._shrink.get(role, (now, size))
            largest = max(largest, size)
            self._shrink[role] = (since, largest)
            # Workers still starting do not hold a shrink back (one may never start: no node offers
            # its resource); the least loaded go first, so a shrink removes them before ready ones.
            if now - since < c.down_cooldown:  # the wish starts over at every change: this is its cooldown too
                detail = f"wished for {now - since:.0f} of {c.down_cooldown:.0f} s; {wish.detail}"
                return result(current, "stabilizing", detail)
            return result(max(largest, current - c.max_step), wish.reason, wish.detail)
        self._shrink.pop(role, None)
        if wish.size > hi:
            return result(current, "at_max", f"wants {wish.size}, bounded by {hi}; {wish.detail}")
        return result(current, "steady" if wish.reason in ("load", "idle") else wish.reason, wish.detail)


def _over(latency: float | None, slo: float) -> bool:
    return latency is not None and latency > slo


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # 2.0000000001 from float noise is 2


def _ms(latency: float | None) -> str:
    return "-" if latency is None else f"{latency:.0f}"

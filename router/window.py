"""What the router saw of its requests since the autoscaler last asked: the planner's window.

The router calls `arrived`, `first_token`, `gap`, `finished` and `refused` as requests go; every
planner interval the autoscaler calls `take(now)`, which hands the window over as plain data and
starts the next one. Plain Python (no asyncio, no locks: the router's loop is its only caller).
Latency samples beyond `max_samples` per window are kept as a uniform sample (reservoir), so a
window's memory is bounded at any load.
"""

from __future__ import annotations

import random


class _Reservoir:
    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng = size, rng
        self.values: list[float] = []
        self.seen = 0

    def add(self, x: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(x)
        else:
            i = self.rng.randrange(self.seen)
            if i < self.size:
                self.values[i] = x


class RequestWindow:
    def __init__(self, now: float, max_samples: int = 50_000, seed: int = 0):
        self.max_samples = max_samples
        self._rng = random.Random(seed)
        self._start(now)

    def _start(self, now: float) -> None:
        self.start = now
        self.arrivals = self.finishes = self.refusals = 0
        self.input_tokens = self.output_tokens = 0
        self.ttft = _Reservoir(self.max_samples, self._rng)
        self.itl = _Reservoir(self.max_samples, self._rng)

    def arrived(self, input_len: int) -> None:
        self.arrivals += 1
        self.input_tokens += input_len

    def first_token(self, seconds: float) -> None:
        self.ttft.add(seconds)

    def gap(self, seconds: float, tokens: int = 1) -> None:
        """`tokens` streamed tokens, `seconds` apart each."""
        for _ in range(tokens):
            self.itl.add(seconds)

    def finished(self, output_len: int) -> None:
        self.finishes += 1
        self.output_tokens += output_len

    def refused(self) -> None:
        self.refusals += 1

    def take(self, now: float) -> dict:
        """The window since the last take (seconds), and a fresh one from `now`."""
        window = {
            "duration": now - self.start, "arrivals": self.arrivals, "finished": self.finishes, "refused": self.refusals,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "ttft_s": self.ttft.values, "itl_s": self.itl.values,
        }  # fmt: skip
        self._start(now)
        return window

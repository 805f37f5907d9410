"""A sender's transfer counters and latency histogram, in the shape worker stats report them."""

from __future__ import annotations

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds


class TransferStats:
    def __init__(self):
        self.count = self.failures = self.bytes = 0
        self.sum = 0.0
        self.buckets = [0] * len(BUCKETS)  # cumulative: transfers that took <= each bound

    def record(self, seconds: float, nbytes: int) -> None:
        self.count += 1
        self.sum += seconds
        self.bytes += nbytes
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1

    def snapshot(self) -> dict:
        return {
            "count": self.count, "sum": self.sum, "bytes": self.bytes, "failures": self.failures,
            "buckets": list(zip(BUCKETS, self.buckets)),
        }  # fmt: skip

"""A request's lifetime events as the router records them, and the phases between them.

Pure (no asyncio, Ray or gRPC), so the router's metrics and the trace tools (benchmarks.chrome_trace)
read a timeline the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseEvent:
    name: str
    seconds: float  # since the request arrived at the router
    worker: str = ""


# (phase, the events that open it, the events that close it). A request that moved repeats events.
PHASES = (
    ("queue", ("arrived", "migrated"), ("reserved", "admitted")),
    ("prefill_queue", ("prefill_queued",), ("prefill_started",)),
    ("prefill", ("prefill_started",), ("prefill_ended",)),
    ("transfer", ("transfer_started",), ("transfer_ended",)),
    ("recovery", ("migrated",), ("first_token",)),
    ("decode", ("first_token",), ("finished", "migrated")),
)


def phase_spans(timeline: list[PhaseEvent]) -> list[tuple[str, float, float, str]]:
    """(phase, start, end, worker) for each phase of a timeline: each end event closes the phase its
    latest start event opened; the worker is the opening event's (else the closing one's)."""
    opened: dict[str, PhaseEvent] = {}
    out = []
    for event in sorted(timeline, key=lambda e: e.seconds):
        for phase, starts, ends in PHASES:
            if event.name in ends and phase in opened:
                start = opened.pop(phase)
                out.append((phase, start.seconds, event.seconds, start.worker or event.worker))
            if event.name in starts:
                opened[phase] = event
    return out


def phase_durations(timeline: list[PhaseEvent]) -> list[tuple[str, float]]:
    return [(phase, end - start) for phase, start, end, _ in phase_spans(timeline)]

"""Chrome / Perfetto trace files (open in ui.perfetto.dev or chrome://tracing) of a run.

Input is plain records, so the simulator and the real router's phase timeline feed it alike:

    Span(request, phase, start, end, worker, args)
      request   the request's id, or None for a worker's own activity (a step, a batch)
      phase     what it was: "queued", "prefill", "transfer", "decode", "prefill step", ...
      start, end   seconds on the run's clock (end == start: an instant)
      worker    the worker it ran on ("" if none)
      args      a small dict shown on click (tokens, batch size...)

A real run's spans come from the router's phase timelines (`timeline_spans`: what `pdserve bench
serve --chrome-trace` writes); a simulated run's from the simulator, with the workers' steps too.

Layout: one process per worker (its steps and batches on one track), and one process
"requests" with a track per request (its phases, each naming its worker).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import NamedTuple

REQUESTS_PID = 1


class Span(NamedTuple):
    request: str | None
    phase: str
    start: float
    end: float
    worker: str = ""
    args: dict | None = None


def timeline_spans(request: str, sent: float, timeline: list[dict]) -> list[Span]:
    """One request's phases, from the timeline its last response carried (router.phases: events
    in seconds since the router took it), placed at `sent`, the run-clock time it was sent."""
    from router.phases import PhaseEvent, phase_spans

    events = [PhaseEvent(e["name"], e["seconds"], e.get("worker", "")) for e in timeline]
    return [Span(request, phase, sent + start, sent + end, worker) for phase, start, end, worker in phase_spans(events)]


def trace_events(spans: Iterable[Span]) -> list[dict]:
    events: list[dict] = [_meta("process_name", REQUESTS_PID, 0, "requests"), _meta("process_sort_index", REQUESTS_PID, 0, 0)]
    pids: dict[str, int] = {}
    tids: dict[str, int] = {}
    for s in spans:
        if s.request is None:
            if s.worker not in pids:
                pids[s.worker] = pid = REQUESTS_PID + 1 + len(pids)
                events += [_meta("process_name", pid, 0, f"worker {s.worker}"), _meta("process_sort_index", pid, 0, pid)]
            pid, tid = pids[s.worker], 0
        else:
            if s.request not in tids:
                tids[s.request] = tid = len(tids) + 1
                events.append(_meta("thread_name", REQUESTS_PID, tid, f"request {s.request}"))
            pid, tid = REQUESTS_PID, tids[s.request]
        args = dict(s.args or {})
        if s.worker and s.request is not None:
            args["worker"] = s.worker
        event = {"name": s.phase, "ph": "X", "pid": pid, "tid": tid, "ts": round(s.start * 1e6, 3),
                 "dur": round(max(0.0, s.end - s.start) * 1e6, 3), "cat": "request" if s.request is not None else "worker"}  # fmt: skip
        if args:
            event["args"] = args
        events.append(event)
    return events


def _meta(name: str, pid: int, tid: int, value) -> dict:
    key = "sort_index" if name.endswith("sort_index") else "name"
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": {key: value}}


def write(spans: Iterable[Span], path: str, metadata: dict | None = None) -> int:
    """Write a trace file; returns how many spans it holds."""
    events = trace_events(spans)
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms", "otherData": metadata or {}}, f)
    return sum(1 for e in events if e["ph"] == "X")

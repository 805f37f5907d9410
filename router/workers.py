"""The router's view of one worker: its actor handle, its state, and the load it routes by."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"  # does both phases; takes whole requests


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"  # takes new requests
    DRAINING = "draining"  # finishes what it has, takes nothing new, then stops
    DEAD = "dead"


@dataclass
class WorkerRecord:
    id: str
    role: Role
    handle: Any  # the Ray actor handle
    state: WorkerState = WorkerState.STARTING
    node: str = ""
    total_blocks: int = 0  # KV pool size, from the worker once ready
    free_blocks: int = 0  # decode/colocated: from the latest poll
    running: int = 0
    queued_tokens: int = 0  # prefill: prompt tokens sent here and not yet delivered
    requests: set[str] = field(default_factory=set)  # live requests using this worker

    @property
    def takes_work(self) -> bool:
        return self.state is WorkerState.READY

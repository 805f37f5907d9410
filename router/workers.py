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
    node: str = ""  # host name
    node_id: str = ""  # Ray's node id
    address: str = ""  # the node's IP address
    pid: int = 0
    total_blocks: int = 0  # KV pool size, from the worker once ready
    max_num_seqs: int = 0  # decode/colocated: the most sequences it holds at once (0: no limit known)
    # decode/colocated, as of the worker's latest load report (`load_serial` orders the reports):
    free_blocks: int = 0  # less those its waiting sequences will take (it can be negative)
    running: int = 0  # sequences it holds: running, waiting or reserved
    load_serial: int = -1
    # ...and what the router has asked of it since, not yet answered (so simultaneous arrivals spread):
    pending: int = 0  # reservations (or colocated submissions) in flight
    pending_blocks: int = 0  # their prompts' KV blocks
    queued_tokens: int = 0  # prefill: prompt tokens sent here and not yet delivered
    requests: set[str] = field(default_factory=set)  # live requests using this worker
    # A worker on its node died: out of the choice until it answers (a lost node's idle workers
    # look healthy until called, and each would cost a moved request one of its moves).
    checking: bool = False

    @property
    def takes_work(self) -> bool:
        return self.state is WorkerState.READY and not self.checking

"""Where a local cluster's CPU time went over a window, and how long its threads waited for a core.

Linux keeps, per thread, /proc/PID/task/TID/schedstat: nanoseconds on a CPU, nanoseconds runnable
but waiting for one, and timeslices. Summed per role over every thread of the cluster's processes
(the `pdserve serve` process holding the router, its workers by the role `status` gives their
pid, and the rest of its process tree: Ray's own), and of this process (the load's client), the
difference between two samples says whether a step ran slow because it computed longer or because
it waited for a core. Linux only; elsewhere the samples are empty.
"""

from __future__ import annotations

import os
from pathlib import Path

Sample = dict[tuple[int, int], tuple[str, int, int]]  # (pid, tid): (role, ns on a CPU, ns waiting for one)


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
    return out


def _tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    tree, frontier = {root}, [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def sample(serve_pid: int, worker_roles: dict[int, str]) -> Sample:
    """Every thread of the cluster's process tree and of this process, with its role and counters."""
    if not Path("/proc/self/task").is_dir():
        return {}
    roles = {pid: worker_roles.get(pid, "ray") for pid in _tree(serve_pid)}
    roles[serve_pid] = "router"
    roles[os.getpid()] = "client"
    out: Sample = {}
    for pid, role in roles.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                run, wait = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[:2]
            except (OSError, ValueError):
                continue
            out[(pid, int(tid))] = (role, int(run), int(wait))
    return out


def difference(before: Sample, after: Sample, seconds: float) -> dict:
    """Per role, CPU seconds and seconds spent waiting for a core between the samples (a thread
    born meanwhile counts whole), the same for its busiest thread (a worker's: the one running its
    engine's steps, whose time neither on a CPU nor waiting for one was spent blocked or idle), and
    how busy the machine's cores were with all of it."""
    roles: dict[str, dict] = {}
    for key, (role, run, wait) in after.items():
        _, run0, wait0 = before.get(key, (role, 0, 0))
        cpu, waited = (run - run0) / 1e9, (wait - wait0) / 1e9
        r = roles.setdefault(role, {"cpu_s": 0.0, "wait_s": 0.0, "busiest_thread": {"cpu_s": 0.0, "wait_s": 0.0}})
        r["cpu_s"] += cpu
        r["wait_s"] += waited
        if cpu > r["busiest_thread"]["cpu_s"]:
            r["busiest_thread"] = {"cpu_s": cpu, "wait_s": waited}
    cores = os.cpu_count() or 1
    busy = sum(r["cpu_s"] for r in roles.values()) / (cores * seconds) if seconds > 0 else None
    return {"seconds": seconds, "cores": cores, "busy": busy, "roles": roles}

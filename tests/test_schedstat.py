"""benchmarks/schedstat.py: CPU time and waits for a core, per role, over a real process tree."""

import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks import schedstat

# A "router" that starts a "worker" computing for 0.6 s of CPU; then both sleep until stopped.
WORKER = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(60)"
ROUTER = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {WORKER!r}])\ntime.sleep(60)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's per-thread schedstat")
def test_a_busy_worker_under_an_idle_router_is_counted_as_the_worker():
    router = subprocess.Popen([sys.executable, "-c", ROUTER])
    tree = {router.pid}
    try:
        deadline = time.monotonic() + 30
        while len(tree := schedstat._tree(router.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        roles = {pid: "prefill" for pid in tree - {router.pid}}
        before = schedstat.sample(router.pid, roles)
        time.sleep(3.0)  # the worker has just started: its 0.6 s of CPU fall in the window
        out = schedstat.difference(before, schedstat.sample(router.pid, roles), 3.0)
    finally:
        for pid in tree:  # the two processes this test started
            os.kill(pid, signal.SIGTERM)
        router.wait(10)
    prefill, server = out["roles"]["prefill"], out["roles"]["router"]
    assert 0.2 < prefill["cpu_s"] <= 0.7 and server["cpu_s"] < 0.1 and prefill["wait_s"] >= 0
    assert "client" in out["roles"] and 0 < out["busy"] <= 1
    assert 0.2 < prefill["busiest_thread"]["cpu_s"] <= prefill["cpu_s"]  # the worker's one computing thread

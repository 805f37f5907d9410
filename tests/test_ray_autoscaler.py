"""Ray's autoscaler under the planner, on one machine: Ray's fake multi-node provider
(`provider: type: fake_multinode`, RAY_FAKE_CLUSTER=1) stands in for a cloud. The cluster starts
as a head only, offering a `decode` slot and no `prefill` one, as a `ray up` cluster's head offers
none: `pdserve serve --address ... --nodes-on-demand --engine mock --autoscale slo` runs on it, and
its first prefill worker asks for {prefill: 1} all the same, so Ray launches a prefill node for it.
Load arrives, the planner grows the prefill pool, the new worker asks for {prefill: 1}, which no
node has left, so Ray launches a second prefill node and the worker serves there; the load leaves,
the pool shrinks (newest worker first) and Ray removes the idle node.

A Ray head, a launched node and a pdserve server, each its own processes: about a minute, part
of `make test` (alone: `pytest -m fake_cluster`). Ray is asked what it sees through one driver
process for the whole test (a driver per question cost seconds each). Every process
it starts is in a process group of its own or carries its temp dir in its command line, and is
stopped by pid; it never runs `ray stop` (other Ray clusters on this machine stay untouched)."""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from benchmarks import free_port
from cluster import cli
from engine.cost_model import CostProfile, Grid, KVSpec, Link

pytestmark = pytest.mark.fake_cluster

PROFILE = CostProfile(  # prompts are slow (1 ms per token), decodes quick: the load is prompt-heavy
    name="fake-cluster", source="derived", model="test-model", hardware="none", kv=KVSpec(8, 2, 32, "bfloat16"),
    prefill=Grid((16, 1024), (0, 4096), ((0.020, 0.020), (1.000, 1.000))),
    decode=Grid((1, 64), (16, 16384), ((0.010, 0.010), (0.040, 0.040))),
    step_overhead_seconds=0.0, startup_seconds=0.0, transfer={"grpc": Link(0.001, 1e9), "nccl": Link(0.001, 1e9)},
)  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def autoscaling_config(gcs: str) -> dict:
    return {
        "cluster_name": "pdserve-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "decode": 1}, "node_config": {}, "max_workers": 0},
            "prefill_node": {"resources": {"CPU": 1, "prefill": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {"ssh_user": "ubuntu"}, "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }  # fmt: skip


DRIVER = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps("connected"), flush=True)
for line in sys.stdin:
    scope = {"ray": ray}
    exec(json.loads(line), scope)
    print(json.dumps(scope["result"]), flush=True)
"""


class RayDriver:
    """One driver process connected to the fake cluster (this process's Ray is the session's own),
    running the snippets it is sent: one connection for the whole test, not one per question."""

    def __init__(self, gcs: str):
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, gcs], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
        assert self._answer(120) == "connected"

    def query(self, code: str):
        """Run `code` (which sets `result`) in the driver; its JSON result."""
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()
        return self._answer(60)

    def _answer(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        assert line, f"the Ray driver did not answer within {timeout:.0f}s (exit code {self.proc.poll()})"
        return json.loads(line)

    def alive_nodes(self) -> list[dict]:
        return self.query("result = [{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]")

    def close(self) -> None:
        self.proc.stdin.close()
        stop(self.proc)


def state(target: str) -> dict:
    return cli.fetch_state(target)


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def stop(process: subprocess.Popen, temp_dir: str | None = None) -> None:
    """By pid: SIGINT (a clean stop), then the process group; then any process left that carries
    our temp dir in its command line (a launched node's raylet outlives its parent). A clean stop
    takes ~2 s; inside the full suite the head's once ran past 60 s, so it gets 10."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
    if temp_dir is None:
        return
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if temp_dir in cmdline and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def fake_cluster(tmp_path):
    import ray

    ip = ray._private.services.get_node_ip_address()
    port = free_port()
    gcs = f"{ip}:{port}"
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs)))
    temp_dir = f"/tmp/pdfk-{port}"  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", f"--autoscaling-config={config}", "--num-cpus=2",
                             '--resources={"decode": 1}', "--include-dashboard=false", f"--temp-dir={temp_dir}",
                             "--block"], env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        wait_for("the Ray head", lambda: head.poll() is None and _connectable(gcs), 120)
        driver = RayDriver(gcs)
        try:
            yield gcs, driver
        finally:
            driver.close()
    finally:
        stop(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _connectable(gcs: str) -> bool:
    host, port = gcs.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


def test_the_planner_grows_a_pool_onto_a_node_ray_launches_and_ray_removes_it_after_the_shrink(fake_cluster, tmp_path):
    gcs, driver = fake_cluster
    head = wait_for("the head node", driver.alive_nodes, 60)
    assert len(head) == 1 and "prefill" not in head[0]["resources"]
    profile = tmp_path / "fake-cluster.json"
    PROFILE.save(profile)
    port = free_port()
    target = f"127.0.0.1:{port}"
    serve = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--address", gcs, "--nodes-on-demand", "--port", str(port), "--engine", f"mock:{profile}",
         "--kv-cache-gb", "0.01", "--max-model-len", "1024", "--prefill", "1", "--decode", "1", "--max-prefill", "2",
         "--max-decode", "1", "--autoscale", "slo", "--min-prefill", "1", "--slo-ttft-ms", "500", "--planner-interval", "2",
         "--planner-option", "up_cooldown=2", "--planner-option", "down_cooldown=6"],
        env={**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    load = None
    try:
        wait_for("the cluster", lambda: serve.poll() is None and _ready(target) == 2, 300)
        assert len(driver.alive_nodes()) == 2, "Ray launched no node for the first prefill worker"
        assert _node_of(driver, "prefill-0") != head[0]["id"], "the first prefill worker is not on the launched node"
        load = subprocess.Popen(  # prompt-heavy: ~1.5x what one prefill worker computes
            [sys.executable, "-m", "cluster.cli", "bench", "autoscale", "--target", target, "--pattern", "constant", "--params",
             "rate=3", "--duration", "600", "--input-len", "512", "--output-len", "4", "--slo-ttft-ms", "500",
             "--out", str(tmp_path / "load.json"), "--disable-tqdm"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

        def grown():
            workers = [w for w in state(target)["workers"] if w["role"] == "prefill"]
            new = [w for w in workers if w["id"] != "prefill-0" and w["state"] == "ready" and w["steps"] > 0]
            return new[0]["id"] if new else None

        new_worker = wait_for("a second prefill worker serving", grown, 300)
        nodes = driver.alive_nodes()
        assert len(nodes) == 3, "Ray launched no node for the new worker"
        assert _node_of(driver, new_worker) not in (head[0]["id"], _node_of(driver, "prefill-0")), "the new worker is not on a node of its own"
        ups = [d for d in state(target)["planner"]["decisions"] if d["role"] == "prefill" and d["direction"] == "up"]
        assert ups
    finally:
        if load is not None:
            stop(load)
    try:
        wait_for("the prefill pool back to one worker",
                 lambda: sum(w["role"] == "prefill" for w in state(target)["workers"]) == 1, 300)  # fmt: skip
        assert [w["id"] for w in state(target)["workers"] if w["role"] == "prefill"] == ["prefill-0"]  # the newest left first
        wait_for("Ray removing the idle node", lambda: len(driver.alive_nodes()) == 2, 300, every=2.0)
    finally:
        stop(serve)


def _node_of(driver: RayDriver, worker_id: str) -> str | None:
    placed = driver.query("result = [a['Address']['NodeID'] for a in ray._private.state.actors().values() "
                          f"if a['Name'].endswith('-{worker_id}') and a['State'] == 'ALIVE']")  # fmt: skip
    return placed[0] if placed else None


def _ready(target: str) -> int:
    try:
        return sum(w["state"] == "ready" for w in state(target)["workers"])
    except grpc.RpcError:
        return 0

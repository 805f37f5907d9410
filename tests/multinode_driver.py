"""A pdserve cluster on a real multi-node Ray on this one machine, losing whole nodes.

Run by tests/test_multinode.py in a process of its own (a process holds one Ray connection, and
the test session's is the local one of conftest's `ray_local`); it acts and observes, writes what
it saw as JSON to the file named by its argument, and the test judges. Every Ray process it starts
it stops, by pid, on every way out.

The nodes: separate raylets, each with its own object store and worker processes, sharing one GCS
and all bound to the loopback address 127.0.0.2 (Ray rewrites 127.0.0.1 to the host's public
address when a driver or `ray start` joins, but takes any other loopback address as given):

    head  {"prefill": 1}   the GCS, this driver and the router; the prefill worker
    B, C  {"decode": 1}    one decode worker each, at most
    D     {"decode": 1}    started only after B and C are gone (at most 3 nodes are alive at once)

Nodes are started the way ray.cluster_utils.Cluster starts them (ray._private.node.Node), not
with it: cluster_utils records its head as this machine's "current cluster" (/tmp/ray), which
would send any other session's plain `ray.init()` here.

The scenario, for each KV transfer backend (grpc, then nccl): 1 prefill + 1 decode worker placed
by the pools' resources; greedy requests whose KV crosses from the head node to a decode node.
Then, on the nccl cluster, with requests streaming: the decode worker's node is killed (its
raylet and every process under it, SIGKILL); the requests move to a replacement on the other
decode node. Then that node is killed too: the decode pool is short (no node offers "decode"),
which status and health report, and a request arriving then waits, until node D joins and the
pending replacement lands on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray._private.node import Node
from ray._private.parameter import RayParams

from cluster.cluster import Cluster
from cluster.config import ServeConfig
from engine.config import EngineConfig
from engine.model_files import resolve_model_dir
from engine.tokenizer import load_tokenizer
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc
from router.router import RouterConfig
from router.server import POOL_HEALTH

IP = "127.0.0.2"
ENGINE = EngineConfig(dtype="float32", kv_cache_gb=0.1, max_model_len=1024)
TEXTS = [
    "The capital of France is", "def fibonacci(n):\n    ", "Roses are red, violets are", "1, 1, 2, 3, 5, 8,",
    "Once upon a time, in a land far away,", "The three primary colors are",
]  # fmt: skip
WAIT = 600.0  # seconds any one step may take (a bound, not an expectation: workers start in seconds on an idle machine)


class Nodes:
    """The raylets started here, and how to kill one for real."""

    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.head: Node | None = None
        self.nodes: dict[str, Node] = {}  # name -> node

    def _params(self, resources: dict) -> RayParams:
        params = RayParams(
            node_ip_address=IP, num_cpus=1, num_gpus=0, resources=resources, object_store_memory=96 << 20,
            min_worker_port=0, max_worker_port=0, temp_dir=self.temp_dir, include_dashboard=False,
        )  # fmt: skip
        if self.head is not None:
            params.update_if_absent(gcs_address=self.head.gcs_address, include_log_monitor=False, node_manager_port=0)
            params.dashboard_agent_listen_port = None  # any free port: two agents on one machine
        else:  # a killed node is declared dead after 3 failed health checks 1 s apart, not Ray's 5 x 3 s
            params._system_config = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
        return params

    def start(self, name: str, resources: dict) -> Node:
        head = self.head is None
        for attempt in range(3):
            # Node gives its raylet 30 s to register, which a loaded machine can miss; then what it
            # started is killed and it starts again (made first, so a failed start can be cleaned up).
            node = Node.__new__(Node)
            try:
                node.__init__(self._params(resources), head=head, shutdown_at_exit=True, spawn_reaper=True)
                break
            except Exception:
                if attempt == 2:
                    raise
                self._kill_processes(node)
        if head:
            self.head = node
        self.nodes[name] = node
        return node

    def kill(self, name: str) -> list[int]:
        """SIGKILL the node's raylet and every process under it (its workers and agents); returns their pids."""
        return self._kill_processes(self.nodes.pop(name))

    @staticmethod
    def _kill_processes(node: Node) -> list[int]:
        procs = []
        for info in getattr(node, "all_processes", {}).values():
            for p in info:
                try:
                    root = psutil.Process(p.process.pid)
                    procs += [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    pass
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        return [p.pid for p in procs]

    def kill_all(self) -> None:
        for name in [n for n in self.nodes if self.nodes[n] is not self.head]:
            self.kill(name)
        if self.head is not None:
            name = next(n for n, node in self.nodes.items() if node is self.head)
            self.kill(name)


# --- observing ------------------------------------------------------------------------------------


def status(target: str) -> dict:
    """`pdserve status --json`, run as a user would."""
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--json", "--target", target],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(out.stdout)


def status_table(target: str) -> str:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--target", target],
                          capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip


def health(target: str, service: str = "") -> str:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def ray_view() -> dict:
    """Ray's own accounting: each live actor's node and pid, each live node's address, pool
    resources offered and still available."""
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    available = ray._private.state.available_resources_per_node()
    return {
        "actors": {a["Name"]: {"node_id": a["Address"]["NodeID"], "pid": a["Pid"]}
                   for a in ray._private.state.actors().values() if a["State"] == "ALIVE" and a["Name"]},  # fmt: skip
        "nodes": {
            node_id: {"address": n["NodeManagerAddress"],
                      "offers": {r: n["Resources"].get(r, 0) for r in ("prefill", "decode")},
                      "available": {r: available.get(node_id, {}).get(r, 0) for r in ("prefill", "decode")}}  # fmt: skip
            for node_id, n in nodes.items()
        },
    }


def wait_for(what: str, check, timeout: float = WAIT, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f}s: {what}")
        time.sleep(every)


def snapshot(cluster: Cluster) -> dict:
    return {"status": status(cluster.target), "ray": ray_view(), "health": health(cluster.target),
            "decode_pool_health": health(cluster.target, POOL_HEALTH + "decode")}  # fmt: skip


# --- requests ---------------------------------------------------------------------------------------


def request(i: int, prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=f"mn-{i}", token_ids=pb.TokenIds(ids=prompt),
                              sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))  # fmt: skip


async def stream(stub, req: pb.GenerateRequest, arrivals: list[float]) -> dict:
    tokens = []
    try:
        async for response in stub.Generate(req, timeout=WAIT):
            tokens += response.token_ids
            arrivals += [time.monotonic()] * len(response.token_ids)
        return {"tokens": tokens, "code": "OK"}
    except grpc.aio.AioRpcError as e:
        return {"tokens": tokens, "code": e.code().name, "details": e.details()}


def generate(target: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    async def body():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await asyncio.gather(*(stream(stub, request(i, p, max_tokens), []) for i, p in enumerate(prompts)))

    return asyncio.run(body())


def generate_through_node_loss(target: str, prompts: list[list[int]], max_tokens: int, kill) -> tuple[list[dict], dict]:
    """Stream the prompts; once every stream has its first tokens, call kill(). Returns the
    results, and when the kill happened and when each stream's next token came after it."""
    arrivals = [[] for _ in prompts]

    async def body():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            tasks = [asyncio.create_task(stream(stub, request(100 + i, p, max_tokens), arrivals[i])) for i, p in enumerate(prompts)]
            deadline = time.monotonic() + WAIT
            while not all(len(a) >= 2 for a in arrivals) and time.monotonic() < deadline and not all(t.done() for t in tasks):
                await asyncio.sleep(0.02)
            held = [len(a) for a in arrivals]
            killed_at = time.monotonic()
            pids = await asyncio.to_thread(kill)
            results = await asyncio.gather(*tasks)
            after = [next((t - killed_at for t in a if t > killed_at), None) for a in arrivals]
            return results, {"tokens_before_kill": held, "next_token_after_kill_s": after, "killed_pids": pids}

    return asyncio.run(body())


# --- the scenario -----------------------------------------------------------------------------------


def engine_for(transfer: str) -> EngineConfig:
    """NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), and these nodes share this
    machine's: with fewer than two GPUs the nccl leg's pools are on the CPU (gloo, the same code)."""
    return ENGINE if transfer == "grpc" or torch.cuda.device_count() > 1 else dataclasses.replace(ENGINE, device="cpu")


def main(out_path: str) -> None:
    tokenizer = load_tokenizer(resolve_model_dir(None))
    prompts = [tokenizer.encode(t) for t in TEXTS]
    report: dict = {"prompts": prompts, "runs": {}}
    nodes = Nodes(tempfile.mkdtemp(prefix="pdmn-", dir="/tmp"))
    try:
        nodes.start("head", {"prefill": 1})
        report["node_ids"] = {"head": nodes.head.node_id}
        for name in ("B", "C"):
            report["node_ids"][name] = nodes.start(name, {"decode": 1}).node_id
        ray.init(address=nodes.head.gcs_address, _node_ip_address=IP, namespace="pdserve-multinode", log_to_driver=False)
        wait_for("three live nodes", lambda: sum(n["Alive"] for n in ray.nodes()) == 3)
        for transfer in ("grpc", "nccl"):
            config = ServeConfig(engine=engine_for(transfer), prefill=1, decode=1, transfer=transfer, port=0,
                                 address=nodes.head.gcs_address, threads_per_worker=1, startup_timeout=WAIT,
                                 router=RouterConfig(admission_timeout=WAIT))  # fmt: skip
            cluster = Cluster(config).start()
            try:
                run = report["runs"][transfer] = {"placed": snapshot(cluster)}
                run["results"] = generate(cluster.target, prompts, 16)
                run["after"] = snapshot(cluster)
                if transfer == "nccl":
                    report["node_loss"] = lose_nodes(cluster, nodes, prompts)
            finally:
                cluster.stop(grace=5)
        report["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported, the test shows it
        import traceback

        report["error"] = traceback.format_exc()
        print(f"driver failed: {e!r}", file=sys.stderr)
    finally:
        ray.shutdown()
        nodes.kill_all()
        if report.get("ok"):
            shutil.rmtree(nodes.temp_dir, ignore_errors=True)
        else:
            report["logs"] = nodes.temp_dir  # Ray's logs of the failed run
        with open(out_path, "w") as f:
            json.dump(report, f)


def decode_worker(state: dict) -> dict | None:
    return next((w for w in state["workers"] if w["role"] == "decode" and w["state"] == "ready"), None)


def lose_nodes(cluster: Cluster, nodes: Nodes, prompts: list[list[int]]) -> dict:
    loss: dict = {}
    first = decode_worker(status(cluster.target))
    victim = next(name for name, node in nodes.nodes.items() if node.node_id == first["node_id"])
    loss["first"] = {"node": victim, "worker": first}

    # 1. The decode worker's node dies mid-stream: its requests move to a replacement on the other decode node.
    results, timing = generate_through_node_loss(cluster.target, prompts, 40, lambda: nodes.kill(victim))
    loss["moved"] = {"results": results, **timing}
    replaced = wait_for("a ready decode worker on another node", lambda: (w := decode_worker(status(cluster.target)))
                        and w["id"] != first["id"] and w)  # fmt: skip
    # pdserve replaces the worker as soon as its actor dies; Ray marks the node dead only once its
    # health checks have failed, which can come later on a loaded machine.
    wait_for("Ray marking the killed node dead", lambda: first["node_id"] not in ray_view()["nodes"])
    loss["replaced"] = {"worker": replaced, **snapshot(cluster)}

    # 2. The last node offering "decode" dies: the pool is short until a node offering it joins.
    second = next(name for name, node in nodes.nodes.items() if node.node_id == replaced["node_id"])
    nodes.kill(second)
    wait_for("the decode pool reported short", lambda: status(cluster.target)["pools"]["decode"]["ready"] == 0)
    wait_for("Ray seeing the node dead", lambda: replaced["node_id"] not in ray_view()["nodes"])
    loss["short"] = {**snapshot(cluster), "table": status_table(cluster.target)}
    with ThreadPoolExecutor(1) as pool:  # a request arriving now waits for the pool to be back
        waiting = pool.submit(generate, cluster.target, prompts[:1], 16)
        loss["node_ids"] = {"D": nodes.start("D", {"decode": 1}).node_id}
        back = wait_for("a ready decode worker on node D", lambda: (w := decode_worker(status(cluster.target)))
                        and w["node_id"] == loss["node_ids"]["D"] and w)  # fmt: skip
        loss["short"]["waited"] = waiting.result(WAIT)[0]
    loss["restored"] = {"worker": back, **snapshot(cluster), "results": generate(cluster.target, prompts, 16)}
    return loss


if __name__ == "__main__":
    main(sys.argv[1])

"""`pdserve serve` as a user runs it: a subprocess with its own local Ray, gRPC and HTTP, overloaded,
then stopped by SIGTERM with streams in flight (they finish; a second SIGTERM cuts the drain short)."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
from gpus import placement
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_cluster import wait_all_free

from benchmarks import free_port
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

CAPACITY, WAITING = 6, 2  # --max-num-seqs of the one decode worker, --max-waiting-requests


def request(i: int, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=f"r{i}", prompt=f"Count to {i + 10}:",
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))  # fmt: skip


async def outcome(stub, req, tokens: list | None = None):
    """("OK", finish reason) or (status code name, details); streamed tokens go into `tokens`."""
    try:
        async for response in stub.Generate(req, timeout=300):
            if tokens is not None:
                tokens += response.token_ids
            if response.finish_reason:
                return "OK", response.finish_reason
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details()
    return "EOF", ""


def test_serve_refuses_overload_then_drains_on_sigterm(tmp_path):
    port, http_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--http-port", str(http_port), "--kv-cache-gb", "0.2", "--max-model-len", "512",
         "--max-num-seqs", str(CAPACITY), "--max-waiting-requests", str(WAITING), "--shutdown-grace", "120",
         *(f"--{k.replace('_', '-')}={v}" for k, v in placement(2).items())],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "pdserve is serving" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.5)
        assert target in log_path.read_text() and f"http://127.0.0.1:{http_port}/v1" in log_path.read_text()
        request_ = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=json.dumps({"prompt": "Hi", "max_tokens": 4}).encode(),
                                          headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request_, timeout=60) as response:
            assert json.loads(response.read())["choices"][0]["finish_reason"] in ("stop", "length")

        async def overload():
            """10x what the cluster holds and queues, at once: the excess is refused, nothing is lost."""
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.GenerationStub(channel)
                return await asyncio.gather(*(outcome(stub, request(i, 24)) for i in range(10 * (CAPACITY + WAITING))))

        results = asyncio.run(overload())
        codes = [code for code, _ in results]
        assert codes.count("OK") == CAPACITY + WAITING and codes.count("RESOURCE_EXHAUSTED") == 9 * (CAPACITY + WAITING), codes
        assert all(detail == "length" for code, detail in results if code == "OK")
        wait_all_free(target)

        async def sigterm_with_streams_in_flight():
            async with grpc.aio.insecure_channel(target) as channel:
                stub, health = pb_grpc.GenerationStub(channel), health_pb2_grpc.HealthStub(channel)
                tokens = [[] for _ in range(5)]
                short = [asyncio.create_task(outcome(stub, request(i, 40), tokens[i])) for i in range(4)]
                endless = asyncio.create_task(outcome(stub, request(4, 400), tokens[4]))
                while not all(tokens):  # all five are decoding
                    await asyncio.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                status = (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)).status
                refused = await outcome(stub, request(5, 4))
                finished = await asyncio.gather(*short)
                proc.send_signal(signal.SIGTERM)  # the endless one would outlast the grace: cut it short
                return status, refused, finished, await endless, [len(t) for t in tokens]

        status, refused, finished, cut, counts = asyncio.run(sigterm_with_streams_in_flight())
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert refused == ("UNAVAILABLE", "the server is shutting down")
        assert finished == [("OK", "length")] * 4 and counts[:4] == [40] * 4
        assert cut[0] == "UNAVAILABLE" and counts[4] < 400
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    # Everything is gone: the port is closed and no process of the group (Ray's included) survives.
    for closed in (port, http_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", closed)) != 0
    time.sleep(1)
    try:
        os.killpg(proc.pid, 0)
        survivors = True
    except ProcessLookupError:
        survivors = False
    assert not survivors, "processes of the serve command outlived it"

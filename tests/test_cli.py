"""`pdserve serve` as a user runs it: a subprocess with its own local Ray, gRPC and HTTP, stopped by SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc

from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_then_shuts_down_on_sigterm(tmp_path):
    port, http_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--http-port", str(http_port), "--kv-cache-gb", "0.2",
         "--max-model-len", "512"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "pdserve is serving" not in (tmp_path / "serve.log").read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        assert f"127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = list(pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_tokens=4, temperature=0)), timeout=60))  # fmt: skip
        assert reply[-1].finish_reason in ("stop", "length")
        assert f"http://127.0.0.1:{http_port}/v1" in (tmp_path / "serve.log").read_text()
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=json.dumps({"prompt": "Hi", "max_tokens": 4}).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["choices"][0]["finish_reason"] in ("stop", "length")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
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

"""Worker death: a decode worker SIGKILLed while requests stream, on each KV transfer backend. How
long until the router moves its requests and each gets its next token, and whether every request
still ends with exactly the tokens of an undisturbed run.

    pdserve bench worker-death [--transfer nccl grpc] [--requests 14] [--json F]

Per backend, a cluster of 1 prefill + 2 decode workers (started here, on a local Ray unless
--address) serves --requests chat requests at once: ShareGPT first user turns, the last two with
seeded sampling and the rest greedy, 64 + 4i new tokens each (EOS ignored). They run twice: first
undisturbed (the reference), then again, and once every one of them has streamed a token, the
decode worker holding the most of them is SIGKILLed (its process, the pid the router knows). The
cluster replaces it; its requests move to the other decode worker, prefilled again with the
tokens they had streamed.

Reported per backend: the requests moved; for them, the seconds from the kill to the router's move
(its timeline's `migrated`) and to their next token at the client (median and max), and the new
attempt's phases after the move (median); the requests whose tokens equal the reference's, and
those that failed (goal: all, and none); KV blocks in use once idle (goal: 0); the pools at the
end; the load average at the kill.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time

from benchmarks import add_cluster_args, bench_ray, save_json
from benchmarks.soak import settle

AFTER_MOVE = ("reserved", "prefill_ended", "first_token")


def chat_requests(num: int, seed: int) -> list:
    """num requests: ShareGPT first user turns of 50-1,200 characters; the last two seeded (seed, seed + 1)."""
    from benchmarks.datasets import sharegpt_pairs
    from protos import generation_pb2 as pb

    texts = [t for t, _ in sharegpt_pairs(limit=20 * num) if 50 <= len(t) <= 1200][:num]
    requests = []
    for i, text in enumerate(texts):
        seeded = dict(temperature=0.8, top_p=0.95, seed=seed + num - 1 - i) if i >= num - 2 else dict(temperature=0.0)
        request = pb.GenerateRequest(request_id=f"wd-{i}", sampling=pb.SamplingParams(max_tokens=64 + 4 * i, ignore_eos=True, **seeded))
        request.messages.messages.add(role="user", content=text)
        requests.append(request)
    return requests


class Streams:
    """The requests streaming at once: each one's tokens, their arrival times, its last response."""

    def __init__(self, target: str, requests: list):
        self.target, self.requests = target, requests
        self.tokens = [[] for _ in requests]
        self.times = [[] for _ in requests]
        self.last = [None] * len(requests)
        self.sent = [0.0] * len(requests)
        self.errors: list[str] = []

    async def run(self, while_streaming=None) -> "Streams":
        import grpc

        from protos import generation_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            streams = asyncio.gather(*(self._one(stub, i) for i in range(len(self.requests))))
            if while_streaming is not None:
                await while_streaming(self)
            await streams
        return self

    async def _one(self, stub, i: int) -> None:
        import grpc

        self.sent[i] = time.monotonic()
        try:
            async for response in stub.Generate(self.requests[i], timeout=600):
                if response.token_ids:
                    self.times[i].append(time.monotonic())
                self.tokens[i] += response.token_ids
                self.last[i] = response
        except grpc.aio.AioRpcError as e:
            self.errors.append(f"{e.code().name}: {e.details()}")

    def migrated_at(self, i: int) -> float | None:
        """Seconds from the request's arrival to the router's move of it, if it moved."""
        last = self.last[i]
        return next((e.seconds for e in last.timeline if e.name == "migrated"), None) if last is not None else None

    def moved(self) -> list[int]:
        return [i for i in range(len(self.requests)) if self.migrated_at(i) is not None]

    def recovery(self, i: int, killed_at: float) -> tuple[float, float | None]:
        """Seconds from the kill to the router's move of moved request i (its detection), and to
        its next token at the client (None if it got none: it failed)."""
        after = [t for t in self.times[i] if t > killed_at]
        return self.sent[i] + self.migrated_at(i) - killed_at, after[0] - killed_at if after else None

    def after_move(self, i: int) -> dict[str, float]:
        """Seconds from moved request i's move to each event of its new attempt."""
        moved = self.migrated_at(i)
        return {e.name: e.seconds - moved for e in self.last[i].timeline if e.seconds >= moved}


async def _wait(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the requests did not all start streaming")
        await asyncio.sleep(0.02)


def run_backend(transfer: str, args) -> dict:
    import torch

    from cluster.cluster import Cluster
    from cluster.config import ServeConfig
    from engine.config import EngineConfig

    engine = EngineConfig(model=args.model, kv_cache_gb=args.kv_cache_gb, max_model_len=1024)
    cluster = Cluster(ServeConfig(engine=engine, prefill=1, decode=2, transfer=transfer, port=0, address=args.address)).start()
    try:
        requests = chat_requests(args.requests, args.seed)
        reference = asyncio.run(Streams(cluster.target, requests).run())
        killed: dict = {}

        async def kill_the_busiest_decode_worker(streams: Streams) -> None:
            await _wait(lambda: all(streams.tokens) or streams.errors, timeout=300)
            decode = [w for w in cluster.router.workers.values() if w.role.value == "decode" and w.takes_work]
            victim = max(decode, key=lambda w: len(w.requests))
            killed.update(worker=victim.id, holding=len(victim.requests), load_average=os.getloadavg()[0], at=time.monotonic())
            os.kill(victim.pid, signal.SIGKILL)

        streams = asyncio.run(Streams(cluster.target, requests).run(kill_the_busiest_decode_worker))
        idle = settle(cluster.target, {"prefill": 1, "decode": 2})
    finally:
        cluster.stop()
    moved = streams.moved()
    same = [a == b for a, b in zip(streams.tokens, reference.tokens)]
    seeded = range(len(requests) - 2, len(requests))  # chat_requests' last two
    recovery = [streams.recovery(i, killed["at"]) for i in moved]
    detect = [seconds for seconds, _ in recovery]
    next_token = [seconds for _, seconds in recovery if seconds is not None]
    phases = [streams.after_move(i) for i in moved]
    after = {}
    for phase in AFTER_MOVE:
        seconds = [p[phase] for p in phases if phase in p]
        after[phase] = statistics.median(seconds) if seconds else None
    return {
        "transfer": cluster.config.transfer, "process_group": ("nccl" if torch.cuda.is_available() else "gloo") if cluster.config.transfer == "nccl" else None,
        "killed": {k: v for k, v in killed.items() if k != "at"}, "moved": len(moved),
        "kill_to_moved_s": _spread(detect), "kill_to_next_token_s": _spread(next_token), "after_move_s": after,
        "requests": len(requests), "identical": sum(same),
        # the ones that stayed put match trivially: the moved ones are the test, seeded sampling's above all
        "identical_moved": sum(same[i] for i in moved), "seeded_moved": sum(i in moved for i in seeded),
        "seeded_moved_identical": sum(i in moved and same[i] for i in seeded),
        "failed": len(streams.errors) + len(reference.errors), "errors": (streams.errors + reference.errors)[:5],
        "blocks_leaked": idle["blocks_leaked"], "pools_at_end": idle["pools"],
    }  # fmt: skip


def _spread(values: list[float]) -> dict | None:
    return {"median": statistics.median(values), "max": max(values)} if values else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve bench worker-death", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfer", nargs="+", default=["nccl", "grpc"], help="KV transfer backends, one cluster each")
    parser.add_argument("--requests", type=int, default=14, help="requests streaming when the worker dies (at least 3)")
    add_cluster_args(parser, transfer=False)
    args = parser.parse_args(argv)
    if args.requests < 3:
        parser.error("--requests must be at least 3: two seeded and one greedy")
    with bench_ray(args.address):
        runs = [run_backend(transfer, args) for transfer in args.transfer]
    report = {"config": {"prefill": 1, "decode": 2, "requests": args.requests}, "runs": runs}
    for r in runs:
        print(f"[{r['transfer']}] SIGKILL of {r['killed']['worker']} holding {r['killed']['holding']}: {r['moved']} moved; "
              f"kill -> moved {_fmt(r['kill_to_moved_s'])}; kill -> next token {_fmt(r['kill_to_next_token_s'])}; "
              f"identical {r['identical']}/{r['requests']}, failed {r['failed']}, blocks in use once idle {r['blocks_leaked']}")  # fmt: skip
    save_json(args.json, report)
    return report


def _fmt(spread: dict | None) -> str:
    return "-" if spread is None else f"median {spread['median']:.2f} s, max {spread['max']:.2f} s"

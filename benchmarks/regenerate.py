"""Regenerate the published benchmark results from the current code: `make bench-results`.

    python -m benchmarks.regenerate [--only NAME ...] [--skip NAME ...] [--tables-only] [--peer vllm] [--list]

Each job runs benches at their published settings through the `pdserve` CLI and writes JSON (and
plots) under benchmarks/results/ (the simulator's searches under benchmarks/sim_results/, the
CPU cost profile under benchmarks/profiles/). Then every block between `<!-- bench:NAME -->`
and `<!-- /bench:NAME -->` in README.md, benchmarks/RESULTS.md and docs/autoscaling.md is
rewritten from those JSON files by benchmarks/tables.py (--tables-only: only that), so no
published figure is typed by hand. Every JSON carries the commit and machine it came from (benchmarks/provenance.py); the
commit is the one the regeneration started from, recorded before the first job dirties the tree.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import free_port, provenance, tables

ROOT = provenance.ROOT
RESULTS = Path("benchmarks/results")
DOCS = ("README.md", "benchmarks/RESULTS.md", "docs/autoscaling.md")
ATTEMPTS = 2  # a command that fails runs once more: on a loaded machine Ray's own start-up can time out (30 s)
MARKER = re.compile(r"(<!-- bench:([\w-]+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.S)


@dataclass(frozen=True)
class Job:
    commands: tuple[tuple[str, ...], ...]  # pdserve argument lists, run in order
    minutes: float  # roughly, on the 2-core development machine (as measured in the end-to-end run of e6f1829; autoscale alone at ee62d46)
    server: tuple[str, ...] = field(default=())  # `pdserve serve` arguments: a cluster that lives through the commands


def _sim_search(workers: int, workload: str, ttft: int, extra: str, suffix: str = "") -> tuple[str, ...]:
    name = f"search-{workers}" + ("" if workload == "chat" else f"-{workload}") + suffix
    return ("sim", "search", "--workers", str(workers), "--workload", workload, "--slo-ttft-ms", str(ttft), "--slo-itl-ms", "30",
            *extra.split(), "--json", f"benchmarks/sim_results/{name}.json")  # fmt: skip


def _autoscale() -> tuple[tuple[str, ...], ...]:
    """The live mock-cluster experiments of RESULTS.md: a new worker's start-up, then the diurnal day at
    20x slowdown, static-max and each planner policy beside its simulated twin (the options each
    policy was tuned with, in stretched seconds; the planners' options reach the static run too, unused)."""
    kv = "--mock-kv-fraction 0.002"  # of the 8B model's KV on a GPU: what this machine's memory holds
    growth = tuple(("bench", "autoscale", "--growth", *startup, "--repeat", str(repeat), "--serve-args", kv,
                    "--out-dir", f"autoscale-runs/growth-{name}", "--json", str(RESULTS / f"autoscale-growth-{name}.json"))
                   for name, startup, repeat in (("0s", ("--startup-seconds", "0"), 2), ("profile", (), 1)))  # fmt: skip
    day = ("bench", "autoscale", "--compare", "--with-sim", "--profile", "llama-3.1-8b-h100", "--slowdown", "20", "--startup-seconds", "1.5",
           "--workload", "diurnal", "--duration", "30", "--params", "period=30", "--slo-ttft-ms", "300", "--slo-itl-ms", "30",
           "--min-prefill", "1", "--max-prefill", "2", "--min-decode", "1", "--max-decode", "4", "--planner-interval", "10", "--disable-tqdm")
    batches = "--max-num-seqs 32 --max-num-batched-tokens 1024"
    runs = (("slo", "static-max", "down_cooldown=30 util_low=0.5"), ("predictive", "", "horizon=55 down_cooldown=30"))
    return growth + tuple(
        (*day, "--modes", modes, "--autoscale", policy, *(x for o in options.split() for x in ("--planner-option", o)),
         "--serve-args", f"{batches} {kv}", "--sim-args", batches,
         "--out-dir", f"autoscale-runs/{policy}", "--json", str(RESULTS / f"autoscale-{policy}.json"),
         "--plot", str(RESULTS / f"autoscale-{policy}.png"))
        for policy, modes, options in runs)  # fmt: skip


def _frontends() -> tuple[tuple[str, ...], ...]:
    load = ("--dataset-name", "random", "--random-input-len", "128", "--random-output-len", "32", "--num-prompts", "24",
            "--max-concurrency", "4", "--ignore-eos", "--disable-tqdm")  # fmt: skip
    where = {"grpc": ("--backend", "grpc", "--target", "127.0.0.1:{port}"), "openai": ("--backend", "openai", "--port", "{http_port}")}
    # One untimed run through both front ends first: the fresh server's first requests (its workers'
    # first steps) would otherwise land on whichever API the timed runs begin with.
    warm_up = tuple(("bench", "serve", *where[api], *load) for api in ("grpc", "openai"))
    return warm_up + tuple(("bench", "serve", *where[api], *load, "--save-result", "--result-filename", str(RESULTS / f"frontends-{api}-{run}.json"))
                           for run in (1, 2) for api in ("grpc", "openai"))  # fmt: skip


JOBS = {
    "engine": Job((("bench", "engine", "--rounds", "3", "--json", str(RESULTS / "engine.json")),), 26),
    "kv-transfer": Job((("bench", "kv-transfer", "--json", str(RESULTS / "kv_transfer.json"), "--plot", str(RESULTS / "kv_transfer.png")),), 1),
    "prefix-cache": Job((("bench", "prefix-cache", "--json", str(RESULTS / "prefix_cache.json")),), 1),
    "chunked-prefill": Job((("bench", "chunked-prefill", "--json", str(RESULTS / "chunked_prefill.json")),), 1),
    "compare": Job((("bench", "compare", "--json", str(RESULTS / "compare.json"), "--plot", str(RESULTS / "compare.png")),), 2),
    "overload": Job((("bench", "overload", "--rounds", "5", "--json", str(RESULTS / "overload.json")),), 2),
    "frontends": Job(_frontends(), 2, server=("serve", "--port", "{port}", "--http-port", "{http_port}")),
    "router": Job(tuple(("bench", "router", "--concurrency", "64", "256", "1024", "--stream-interval", str(n),
                         "--json", str(RESULTS / f"router-si{n}.json")) for n in tables.ROUTER_STREAM_INTERVALS), 3),  # fmt: skip
    "soak": Job((("bench", "soak", "--json", str(RESULTS / "soak.json"), "--plot", str(RESULTS / "soak.png")),), 11),
    "worker-death": Job((("bench", "worker-death", "--json", str(RESULTS / "worker_death.json")),), 3),
    "sim-scale": Job((("bench", "sim-scale", "--json", str(RESULTS / "sim_scale.json")),), 6),
    "sim-search": Job((
        _sim_search(8, "chat", 300, "--duration 30 --iterations 3 --guess 6"),
        _sim_search(64, "chat", 300, "--duration 5 --iterations 2 --guess 60 --splits 16,20,24,28,32"),
        _sim_search(512, "chat", 300, "--duration 2 --iterations 1 --guess 700 --splits 192"),
        _sim_search(512, "chat", 300, "--shards 16 --duration 30 --iterations 3 --guess 700", "-sharded"),
        _sim_search(8, "interference", 1000, "--duration 30 --iterations 3 --guess 3"),
    ), 25),  # fmt: skip
    "sim-validate": Job((("bench", "sim-validate", "--json", str(RESULTS / "sim_validate.json"), "--out-dir", "sim-validate-runs"),), 17),
    "autoscale": Job(_autoscale(), 40),
    "profile": Job((("profile", "--name", "smollm2-135m-cpu", "--threads", "1", "--clock", "cpu", "--prefill-context", "0", "512", "2048",
                    "--out", "benchmarks/profiles/smollm2-135m-cpu.json"),), 4),
}


def run_job(name: str, job: Job, peers: list[str], env: dict) -> None:
    ports = {"port": free_port(), "http_port": free_port()}
    server = None
    if job.server:
        server = subprocess.Popen([sys.executable, "-m", "cluster.cli", *(a.format(**ports) for a in job.server)], cwd=ROOT, env=env)
        _wait_ready(ports["port"], server)
    try:
        for command in job.commands:
            argv = [a.format(**ports) for a in command]
            if argv[:2] == ["bench", "engine"]:
                argv += [x for peer in peers for x in ("--peer", peer)]
            for attempt in range(ATTEMPTS):
                print(f"\n[{name}] pdserve {' '.join(argv)}" + (f" (attempt {attempt + 1})" if attempt else ""), flush=True)
                if subprocess.run([sys.executable, "-m", "cluster.cli", *argv], cwd=ROOT, env=env).returncode == 0:
                    break
            else:
                raise RuntimeError(f"[{name}] pdserve {' '.join(argv)} failed {ATTEMPTS} times")
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=120)


def _wait_ready(port: int, server: subprocess.Popen, timeout: float = 600) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(2)
    raise RuntimeError(f"the server on port {port} did not become ready (exit code {server.poll()})")


def render_doc(text: str, doc: str, root: Path = ROOT) -> tuple[str, list[str], list[str]]:
    """`text` (the document `doc`, relative to root) with its marked blocks rendered from the JSON:
    (new text, blocks rendered, blocks whose JSON is missing: they say so)."""
    unknown = {m.group(2) for m in MARKER.finditer(text)} - set(tables.TABLES)
    if unknown:
        raise ValueError(f"{doc}: no table renders {sorted(unknown)}")
    done, missing = [], []

    def render(m: re.Match) -> str:
        try:
            block = tables.render(m.group(2), root, Path(doc).parent)
            done.append(m.group(2))
        except FileNotFoundError as e:
            missing.append(m.group(2))
            job = next((n for n, j in JOBS.items() if any(Path(e.filename).name in " ".join(c) for c in j.commands)), None)
            block = f"_Not generated yet: no `{Path(e.filename).name}`" + (f" (`python -m benchmarks.regenerate --only {job}`)" if job else "") + "._"
        return m.group(1) + block + "\n" + m.group(4)

    return MARKER.sub(render, text), done, missing


def rewrite_tables(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """Rewrite every marked block of the docs: (blocks rendered, blocks whose JSON is missing)."""
    done, missing = [], []
    for doc in DOCS:
        text, d, m = render_doc((root / doc).read_text(), doc, root)
        (root / doc).write_text(text)
        done += d
        missing += m
    return done, missing


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.regenerate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=sorted(JOBS), help="run only these jobs")
    parser.add_argument("--skip", nargs="+", choices=sorted(JOBS), default=[], help="do not run these jobs")
    parser.add_argument("--tables-only", action="store_true", help="run nothing; rewrite the tables from the JSON there is")
    parser.add_argument("--peer", action="append", default=[], help="bench engine --peer (e.g. vllm)")
    parser.add_argument("--list", action="store_true", help="print the jobs and their commands")
    args = parser.parse_args(argv)
    names = [n for n in (args.only or JOBS) if n not in args.skip]
    if args.list:
        for n in names:
            print(f"{n} (~{JOBS[n].minutes:g} min on 2 cores):" + "".join(f"\n    pdserve {' '.join(c)}" for c in JOBS[n].commands))
        return
    if not args.tables_only:
        (ROOT / RESULTS).mkdir(exist_ok=True)
        env = {**os.environ, provenance.COMMIT_ENV: provenance.commit(), "PYTHONPATH": str(ROOT)}
        for n in names:
            started = time.perf_counter()
            run_job(n, JOBS[n], args.peer, env)
            print(f"[{n}] done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    done, missing = rewrite_tables()
    print("rewrote tables: " + ", ".join(done))
    if missing:
        print("not generated yet (no JSON): " + ", ".join(missing))


if __name__ == "__main__":
    main()

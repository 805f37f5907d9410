"""The `pdserve` command.

    pdserve serve [--prefill N --decode M | --colocated N] [--transfer auto|nccl|grpc] [--address RAY]
                  [--autoscale slo|predictive --min-prefill 1 --max-prefill 16 --min-decode 1 --max-decode 16
                   --slo-ttft-ms 1000 --slo-itl-ms 100 --planner-interval 10 [--profile P]]
                  [--http-port 8000] [--api-key KEY ...] [--admin-key KEY] [--tls-cert F --tls-key F]
    pdserve generate "text" [--target host:port] [--raw] [--api-key KEY] [--tls-ca F]
    pdserve status [--json]
    pdserve scale --prefill N --decode M          (with --autoscale: pins those pools; --min-/--max-X: the planner's bounds)
    pdserve bench engine|kv-transfer|serve|compare|prefix-cache|chunked-prefill|overload|sim-scale|sim-validate|autoscale|soak|worker-death|router ...
    pdserve profile [--model M] [--out F.json] [--quick]
    pdserve sim [search|oracle] ...    simulate a cluster on a cost profile (never imports torch or Ray)
    pdserve report A.json [B.json ...]  tabulate run reports side by side, overlay their timelines
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading

import grpc

from cluster import client


# Commands that parse their own arguments (and import only what they need: `pdserve sim` never loads torch).
PASSTHROUGH = {"sim": "simulator.cli", "report": "benchmarks.run_report"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in PASSTHROUGH:
        import importlib

        importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    _serve_parser(commands.add_parser("serve", help="start a cluster and its gRPC router"))
    _generate_parser(commands.add_parser("generate", help="stream a reply from a running cluster"))
    status = commands.add_parser("status", help="pools, workers and KV blocks of a running cluster")
    client.add_client_args(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    scale = commands.add_parser("scale", help="resize the pools of a running cluster (removed workers drain first)",
                                description="Resize pools (removed workers drain first). On a cluster with --autoscale, a size pins "
                                            "that pool there (the planner's bounds become [N, N]); --min-X/--max-X set the "
                                            "planner's bounds for pool X, handing it back to the planner.")  # fmt: skip
    client.add_client_args(scale, key_env="PDSERVE_ADMIN_KEY")
    for pool in ("prefill", "decode", "colocated"):
        scale.add_argument(f"--{pool}", type=_count)
        scale.add_argument(f"--min-{pool}", type=_count)
        scale.add_argument(f"--max-{pool}", type=_count)
    bench = commands.add_parser("bench", help="benchmarks (see benchmarks/): pdserve bench NAME --help")
    bench.add_argument("which", choices=sorted(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    commands.add_parser("sim", help="simulate a cluster on a cost profile: pdserve sim --help, pdserve sim search --help, "
                                           "pdserve sim oracle --help")
    commands.add_parser("report", help="tabulate run reports side by side and overlay their timelines: pdserve report --help")
    commands.add_parser("profile", help="measure this machine's cost profile (pdserve profile --help)", add_help=False)
    args, args.profile_options = parser.parse_known_args(argv)  # the profile command parses its own
    if args.profile_options and args.command != "profile":
        parser.error(f"unrecognized arguments: {' '.join(args.profile_options)}")
    try:
        return {"serve": serve, "generate": generate, "status": status_command, "scale": scale_command, "bench": bench_command,
                "profile": profile_command}[args.command](args)  # fmt: skip
    except KeyboardInterrupt:  # Ctrl-C on a client command: no traceback (serve drains on its own handler)
        return 130


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


# --- serve -----------------------------------------------------------------------------------------


def _serve_parser(p: argparse.ArgumentParser) -> None:
    # None tells a size given beside --colocated, which has no use for it.
    p.add_argument("--prefill", type=int, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, help="decode workers (default 1)")
    p.add_argument("--colocated", type=int, default=0, help="instead of the two pools: N workers doing both phases")
    p.add_argument("--transfer", default="auto", choices=["auto", "nccl", "grpc"],
                   help="KV transfer backend; auto = the faster one for this hardware")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="router address (0.0.0.0 to accept remote clients)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--http-port", type=int, help="serve the OpenAI-compatible HTTP API on this port (off by default)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (off by default)")
    p.add_argument("--served-model-name", help="the model's name in the APIs (default: the model folder's name)")
    p.add_argument("--allowed-origins", nargs="+", default=(), metavar="ORIGIN",
                   help="web origins whose pages may call the HTTP API (CORS; '*' for any; default none)")
    for pool in ("prefill", "decode", "colocated"):  # None tells a flag given for the other mode's pools (refused)
        p.add_argument(f"--max-{pool}", type=int, help=f"most {pool} workers a Scale (or the planner) may ask for (default {_MAX_WORKERS})")
    auto = p.add_argument_group("autoscaling (cluster/planner.py; docs/autoscaling.md)")
    auto.add_argument("--autoscale", choices=["slo", "predictive"], help="let the planner size the pools, within the bounds below "
                                                                        "(--max-X above); --prefill/--decode are the sizes it starts at")  # fmt: skip
    # Their defaults are applied in planner_config: None tells a flag given without --autoscale.
    for pool in ("prefill", "decode", "colocated"):
        auto.add_argument(f"--min-{pool}", type=int, help=f"fewest {pool} workers the planner keeps (default 1)")
    auto.add_argument("--slo-ttft-ms", type=float, help="time-to-first-token SLO (at --slo-percentile; default 1000)")
    auto.add_argument("--slo-itl-ms", type=float, help="inter-token latency SLO (default 100)")
    auto.add_argument("--slo-percentile", type=int, choices=[50, 90, 99], help="default 90")
    auto.add_argument("--planner-interval", type=float, help="seconds between decisions (the router's window; default 10)")
    auto.add_argument("--profile", help="cost profile of the predictive policy (default: the mock engine's)")
    auto.add_argument("--planner-option", action="append", metavar="NAME=VALUE",
                      help="any other PlannerConfig field, e.g. up_cooldown=20 down_cooldown=60 horizon=30 max_step=2")  # fmt: skip
    access = p.add_argument_group("access (gRPC and HTTP)")
    access.add_argument("--api-key", action="append",
                        help="a key callers must send as 'Authorization: Bearer KEY' (repeatable; default: "
                             "$PDSERVE_API_KEY, comma-separated); none: open to anyone who reaches the ports")  # fmt: skip
    access.add_argument("--admin-key", action="append",
                        help="a key for the Admin service (Scale), and everything else (repeatable; default: $PDSERVE_ADMIN_KEY)")
    access.add_argument("--tls-cert", help="PEM certificate chain: TLS on the gRPC and HTTP ports")
    access.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local Ray")
    p.add_argument("--nodes-on-demand", action="store_true",
                   help="Ray's autoscaler launches the nodes (a `ray up` cluster): each worker asks for its pool's resource "
                        "('prefill'/'decode') and GPUs even before a live node offers them, so Ray launches one that does")  # fmt: skip
    p.add_argument("--threads-per-worker", type=int, help="torch threads per worker (CPU default: cores / workers)")
    p.add_argument("--gpus-per-worker", type=float,
                   help="GPUs per worker where there are GPUs (default: 1, or on a local Ray with fewer GPUs than workers an "
                        "equal share, KV over gRPC; 0.5: two workers share one, not with NCCL transfer)")  # fmt: skip
    p.add_argument("--migration-limit", type=int, default=3, help="moves per request after worker deaths (default 3)")
    p.add_argument("--unresponsive-after", type=float, default=30.0,
                   help="seconds a worker may answer nothing (frozen, its host hung) before it is taken for dead: "
                        "its requests move and it is replaced (default 30)")  # fmt: skip
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed response at least (the first and last go at once); > 1: less router CPU a token")  # fmt: skip
    p.add_argument("--max-waiting-requests", type=int, default=256,
                   help="requests waiting for KV room; beyond them RESOURCE_EXHAUSTED at once (default 256)")  # fmt: skip
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM, seconds for requests in flight to finish (default 30; a 2nd signal: at once)")  # fmt: skip
    engine = p.add_argument_group("engine (every worker)")
    engine.add_argument("--model", help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    engine.add_argument("--device", default="auto")
    engine.add_argument("--dtype", default="auto")
    engine.add_argument("--kv-cache-gb", type=float, help="KV pool per worker (default: a fraction of free memory)")
    engine.add_argument("--max-model-len", type=int)
    engine.add_argument("--max-num-seqs", type=int, default=256)
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    engine.add_argument("--chunk-size", type=int, help="most prompt tokens of one request per step")
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--no-chunked-prefill", action="store_true")
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument("--engine", default="real", metavar="real|mock[:PROFILE]",
                        help="mock: timed stand-ins for the model, on a cost profile (a JSON file or a shipped name)")  # fmt: skip
    engine.add_argument("--mock-kv-fraction", type=float, default=1.0,
                        help="mock: share of the profiled model's KV bytes per token each worker stores and ships")  # fmt: skip


_MAX_WORKERS = 16  # --max-X's default


def _pool_bounds(args) -> dict[str, int]:
    """--max-X of each pool, defaults applied; a bound on a pool the cluster's mode does not have
    (--max-prefill with --colocated, --min-colocated without) is refused, not silently ignored."""
    others = ("prefill", "decode") if args.colocated else ("colocated",)
    given = [f"--{end}-{pool}" for pool in others for end in ("min", "max") if getattr(args, f"{end}_{pool}") is not None]
    if given:
        mode = "colocated" if args.colocated else "disaggregated"
        raise SystemExit(f"pdserve serve: error: {given[0]} bounds a pool a {mode} cluster does not have")
    return {pool: _MAX_WORKERS if getattr(args, f"max_{pool}") is None else getattr(args, f"max_{pool}")
            for pool in ("prefill", "decode", "colocated")}  # fmt: skip


_AUTOSCALE_DEFAULTS = {"min_prefill": 1, "min_decode": 1, "min_colocated": 1, "slo_ttft_ms": 1000.0, "slo_itl_ms": 100.0,
                       "slo_percentile": 90, "planner_interval": 10.0, "planner_option": [], "profile": None}  # fmt: skip


def planner_config(args, highest: dict[str, int]):
    """The planner's configuration from serve's flags; None without --autoscale (a planner's flag
    given without it is an error: silently ignored, it would look like autoscaling is on);
    `highest`: each pool's --max-X (_pool_bounds)."""
    if not args.autoscale:
        given = [name for name in _AUTOSCALE_DEFAULTS if getattr(args, name) is not None]
        if given:
            raise SystemExit(f"pdserve serve: error: --{given[0].replace('_', '-')} needs --autoscale slo|predictive")
        return None
    from cluster.planner import PlannerConfig, parse_options

    value = {name: default if getattr(args, name) is None else getattr(args, name) for name, default in _AUTOSCALE_DEFAULTS.items()}
    bounds = {**{f"min_{pool}": value[f"min_{pool}"] for pool in highest}, **{f"max_{pool}": n for pool, n in highest.items()}}
    try:
        return PlannerConfig(**{**dict(policy=args.autoscale, slo_ttft_ms=value["slo_ttft_ms"], slo_itl_ms=value["slo_itl_ms"],
                                       percentile=value["slo_percentile"], interval=value["planner_interval"],
                                       prefill_max_tokens=args.max_num_batched_tokens, decode_max_batch=args.max_num_seqs, **bounds),
                                **parse_options(value["planner_option"])})  # fmt: skip
    except (TypeError, ValueError) as e:
        raise SystemExit(f"pdserve serve: error: {e}") from None


def serve(args) -> int:
    from cluster.cluster import Cluster
    from cluster.config import ServeConfig
    from engine.config import EngineConfig
    from router.router import RouterConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, kv_cache_gb=args.kv_cache_gb,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, chunk_size=args.chunk_size, block_size=args.block_size,
        enable_chunked_prefill=not args.no_chunked_prefill, enable_prefix_caching=not args.no_prefix_caching,
        engine=args.engine, mock_kv_fraction=args.mock_kv_fraction,
    )  # fmt: skip
    if args.colocated and (args.prefill is not None or args.decode is not None):
        raise SystemExit("pdserve serve: error: --colocated N replaces the two pools: drop --prefill/--decode")
    highest = _pool_bounds(args)
    config = ServeConfig(
        autoscale=planner_config(args, highest), planner_profile=args.profile, engine=engine,
        prefill=1 if args.prefill is None else args.prefill, decode=1 if args.decode is None else args.decode,
        colocated=args.colocated, transfer=args.transfer,
        host=args.host, port=args.port, http_port=args.http_port, metrics_port=args.metrics_port, address=args.address,
        nodes_on_demand=args.nodes_on_demand,
        threads_per_worker=args.threads_per_worker, gpus_per_worker=args.gpus_per_worker, served_model_name=args.served_model_name,
        allowed_origins=tuple(args.allowed_origins),
        # Keys on the command line replace the environment's (rotating a leaked key must drop it).
        api_keys=tuple(args.api_key or _env_keys("PDSERVE_API_KEY")), admin_keys=tuple(args.admin_key or _env_keys("PDSERVE_ADMIN_KEY")),
        tls_cert=args.tls_cert, tls_key=args.tls_key,
        **{f"max_{pool}": n for pool, n in highest.items()},
        shutdown_grace=args.shutdown_grace,
        router=RouterConfig(migration_limit=args.migration_limit, max_waiting_requests=args.max_waiting_requests,
                            stream_interval=args.stream_interval, unresponsive_after=args.unresponsive_after),  # fmt: skip
    )  # fmt: skip
    try:
        config.resolve()  # bad flags end here, in one line, before Ray or a model is started
        _check_ports_free(config)
    except (ValueError, OSError) as e:
        raise SystemExit(f"pdserve serve: error: {e}") from None
    if not (config.api_keys or config.admin_keys) and not _loopback(config.host):
        logging.warning("serving on %s with no API key: anyone who reaches the ports can generate and resize the pools "
                        "(--api-key, --admin-key)", config.host)  # fmt: skip
    stop = threading.Event()
    cluster = Cluster(config)

    def on_signal(*_):  # the first drains (requests in flight finish), a second cuts the drain short
        if stop.is_set():
            cluster.hurry()
        stop.set()

    try:
        cluster.start()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after start: ray.init installs handlers of its own
            signal.signal(sig, on_signal)
        _settle_heap()
        c = cluster.config
        pools = f"{c.colocated} colocated" if c.colocated else f"{c.prefill} prefill + {c.decode} decode ({c.transfer} KV transfer)"
        if c.engine.mock_profile is not None:
            pools += f", {c.engine.engine} engines (no model: timed stand-ins)"
        if c.autoscale is not None:
            a = c.autoscale
            pools += (f"; autoscaling ({a.policy}: TTFT p{a.percentile} <= {a.slo_ttft_ms:g} ms, ITL <= {a.slo_itl_ms:g} ms, "
                      f"every {a.interval:g}s)")  # fmt: skip
        lines = [
            f"\npdserve is serving {pools} on {cluster.target}",
            f'  pdserve generate "Hello!" --target {cluster.target}',
            f"  pdserve status --target {cluster.target}",
        ]
        if not c.tls:
            lines.append(f"  grpcurl -plaintext -d '{{\"prompt\": \"Hello\"}}' {cluster.target} pdserve.v1.Generation/Generate")
        if cluster.base_url:
            lines.append(f"  OpenAI API: {cluster.base_url}/v1 (e.g. curl {cluster.base_url}/v1/models)")
        if cluster.metrics_port:
            lines.append(f"  metrics: http://{c.host}:{cluster.metrics_port}/metrics")
        print("\n".join([*lines, "Ctrl-C drains and stops everything (a second Ctrl-C: at once)."]), flush=True)
        stop.wait()
    finally:
        print(f"shutting down: requests in flight have {config.shutdown_grace:.0f}s to finish...", file=sys.stderr, flush=True)
        cluster.stop()
    return 0


def _check_ports_free(config) -> None:
    """A taken port, found now rather than after Ray and the workers' models have started."""
    for port in (config.port, config.http_port, config.metrics_port):
        if port:  # None: off; 0: any free one
            try:
                socket.create_server((config.host, port), family=socket.AF_INET6 if ":" in config.host else socket.AF_INET).close()
            except OSError as e:
                raise OSError(f"cannot listen on {config.host}:{port}: {e.strerror}") from None


def _settle_heap() -> None:
    """This process is the router: at 1,024 streams its event loop allocates a few objects per
    streamed token, and Python's cyclic GC took ~15% of the loop thread's CPU (perf). Freezing
    what start-up left (Ray, gRPC, the tokenizer) out of the collector's sight, as vLLM's servers
    do, took that to ~11%; collecting the young generation every 20,000 allocations instead of
    700 (and each older one after 20 collections of the one below, not 10), to under 1%. Both
    were measured together; the older thresholds alone were not."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


# --- clients ---------------------------------------------------------------------------------------


def _env_keys(name: str) -> list[str]:
    return [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _generate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("text")
    client.add_client_args(p)
    p.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    p.add_argument("--system", help="a system message (chat mode)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")


def generate(args) -> int:
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    request = pb.GenerateRequest()
    if args.raw:
        request.prompt = args.text
    else:
        if args.system:
            request.messages.messages.add(role="system", content=args.system)
        request.messages.messages.add(role="user", content=args.text)
    s = request.sampling
    s.max_tokens, s.temperature = args.max_tokens, args.temperature
    s.stop.extend(args.stop)
    for name in ("top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    with client.channel(args.target, args.tls_ca) as channel:
        try:
            stream = pb_grpc.GenerationStub(channel).Generate(request, timeout=args.timeout, metadata=client.metadata(args.api_key))
            for response in stream:
                print(response.text, end="", flush=True)
                if response.finish_reason:
                    u = response.usage
                    print(f"\n[{response.finish_reason}: {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens]",
                          file=sys.stderr)  # fmt: skip
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def fetch_state(target: str, timeout: float = 30.0) -> dict:
    """The cluster's state as `pdserve status --json` shows it, from a router without TLS or key (a local one)."""
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    with client.channel(target) as channel:
        return state_to_dict(pb_grpc.GenerationStub(channel).GetClusterState(pb.GetClusterStateRequest(), timeout=timeout))


def state_to_dict(state) -> dict:
    """ClusterState as plain JSON (numbers as numbers; proto3's own JSON mapping quotes 64-bit ints)."""
    return {
        "mode": state.mode,
        "transfer": state.transfer,
        "engine": state.engine,
        "planner": _planner_to_dict(state.planner) if state.HasField("planner") else None,
        "workers": [
            {
                "id": w.id, "role": w.role, "state": w.state, "node": w.node, "node_id": w.node_id,
                "node_address": w.node_address, "pid": w.pid, "running": w.running, "waiting": w.waiting,
                "kv_blocks": {k: getattr(w.kv_blocks, k) for k in ("total", "free", "cached", "in_use")},
                "prefix_cache": {k: getattr(w.prefix_cache, k) for k in ("query_tokens", "hit_tokens")},
                "preemptions": w.preemptions, "steps": w.steps, "chunked_prefill_steps": w.chunked_prefill_steps,
                "queued_tokens": w.queued_tokens, "busy_seconds": w.busy_seconds, "busy_cpu_seconds": w.busy_cpu_seconds,
            }  # fmt: skip
            for w in state.workers
        ],
        "pools": {p.name: {"target": p.target, "ready": p.ready} for p in state.pools},
    }


def _planner_to_dict(p) -> dict:
    fields = ("at", "time", "role", "current", "target", "direction", "reason", "detail")
    return {
        "policy": p.policy, "interval": p.interval, "slo": {"ttft_ms": p.slo_ttft_ms, "itl_ms": p.slo_itl_ms},
        "targets": dict(p.targets), "bounds": {role: [b.min, b.max] for role, b in p.bounds.items()}, "rounds": p.rounds,
        "decisions": [{f: getattr(d, f) for f in fields} for d in p.decisions],
    }  # fmt: skip


def status_command(args) -> int:
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    with client.channel(args.target, args.tls_ca) as channel:
        try:
            state = pb_grpc.GenerationStub(channel).GetClusterState(pb.GetClusterStateRequest(), timeout=30,
                                                                    metadata=client.metadata(args.api_key))  # fmt: skip
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    _print_state(state_to_dict(state), args.json)
    return 0


def scale_command(args) -> int:
    from protos import generation_pb2 as pb
    from protos import generation_pb2_grpc as pb_grpc

    request = pb.ScaleRequest()
    for pool in ("prefill", "decode", "colocated"):
        for name in (pool, f"min_{pool}", f"max_{pool}"):
            if getattr(args, name) is not None:
                setattr(request, name, getattr(args, name))
    with client.channel(args.target, args.tls_ca) as channel:
        try:
            state = pb_grpc.AdminStub(channel).Scale(request, timeout=3600, metadata=client.metadata(args.api_key))
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    _print_state(state_to_dict(state), as_json=False)
    return 0


def _print_state(state: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(state, indent=2))
        return
    print(f"mode: {state['mode']}" + (f", KV transfer: {state['transfer']}" if state["transfer"] else ""))
    planner = state.get("planner")
    if planner:
        bounds = ", ".join(f"{role} {lo}-{hi}" for role, (lo, hi) in planner["bounds"].items())
        targets = ", ".join(f"{role} {n}" for role, n in planner["targets"].items()) or "none yet"
        print(f"planner: {planner['policy']} every {planner['interval']:g}s, bounds {bounds}; targets {targets}")
        latest = {d["role"]: d for d in planner["decisions"]}
        for d in latest.values():
            print(f"  {d['role']}: {d['direction']} {d['current']} -> {d['target']} ({d['reason']}: {d['detail']})")
    print(f"{'worker':<14}{'role':<11}{'state':<10}{'running':>8}{'waiting':>8}{'blocks':>8}{'free':>7}{'cached':>7}"
          f"{'in use':>7}{'hit/query tokens':>20}{'preempt':>8}  {'address':<16}{'pid':>8}  node id")  # fmt: skip
    for w in state["workers"]:
        kv, pc = w["kv_blocks"], w["prefix_cache"]
        print(f"{w['id']:<14}{w['role']:<11}{w['state']:<10}{w['running']:>8}{w['waiting']:>8}{kv['total']:>8}{kv['free']:>7}"
              f"{kv['cached']:>7}{kv['in_use']:>7}{pc['hit_tokens']:>11}/{pc['query_tokens']:<8}{w['preemptions']:>8}"
              f"  {w['node_address']:<16}{w['pid']:>8}  {w['node_id'][:16]}")  # fmt: skip
    for name, pool in state["pools"].items():
        if pool["ready"] < pool["target"]:
            print(f"{name} pool short: {pool['ready']} of {pool['target']} ready")


BENCHMARKS = {
    "engine": "benchmarks.engine",  # our engine against transformers
    "kv-transfer": "benchmarks.kv_transfer",  # KV transfer latency per backend and size
    "serve": "benchmarks.serve",  # a load against a running cluster
    "compare": "benchmarks.compare",  # colocated against disaggregated
    "prefix-cache": "benchmarks.prefix_cache",  # TTFT with a cached prefix
    "chunked-prefill": "benchmarks.chunked_prefill",  # decode ITL while a long prompt arrives
    "overload": "benchmarks.overload",  # bursts of 10x capacity: refused fast, admitted ones keep their latency
    "sim-scale": "benchmarks.sim_scale",  # the simulator's speed on a big cluster
    "autoscale": "benchmarks.autoscale",  # a time-varying load against a cluster; --compare: static vs autoscaled pools
    "soak": "benchmarks.soak",  # hours of mixed load with workers killed: nothing lost, no leak, flat memory
    "worker-death": "benchmarks.worker_death",  # a decode worker killed mid-stream: how fast its requests move, tokens exact
    "router": "benchmarks.router_bench",  # one real router at GPU rates: CPU per 1k tokens, added latency
    "sim-validate": "benchmarks.sim_validate",  # the simulator against mock and real clusters on the same arrivals
}


def bench_command(args) -> int:
    import importlib

    importlib.import_module(BENCHMARKS[args.which]).main(args.rest)
    return 0


def profile_command(args) -> int:
    from benchmarks import profile

    profile.main(args.profile_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())

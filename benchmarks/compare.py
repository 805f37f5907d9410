"""Colocated against disaggregated serving: the same workload, the same number of worker
processes, side by side.

    pdserve bench compare [--workers 2] [--dataset interference|sharegpt|random] [--num-prompts 40]
                          [--request-rate 2] [--json F] [--plot F.png] [--transfer auto] [--kv-cache-gb 0.5]

Each mode gets a cluster of its own on one Ray (started here unless --address): `--colocated N`,
then N/2 prefill + N/2 decode workers. The requests, arrival times and seeds are identical.

The default workload, "interference", is the case disaggregation exists for: short prompts that
decode long replies (chat turns) mixed with long prompts that need short answers (documents to
summarise). Colocated, each long prompt's prefill shares steps with the running decodes and
stretches their inter-token latency; disaggregated, it runs on the prefill pool and the decodes
do not feel it (they pay the KV transfer in TTFT instead).
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np

from benchmarks import bench_ray, save_json
from benchmarks.serve import Endpoint, add_workload_args, calculate_metrics, local_tokenizer, parse_goodput, run_load, workload

COLUMNS = [
    ("mean_ttft_ms", "TTFT mean (ms)"), ("p99_ttft_ms", "TTFT p99 (ms)"), ("median_itl_ms", "ITL p50 (ms)"),
    ("p99_itl_ms", "ITL p99 (ms)"), ("p99_tpot_ms", "TPOT p99 (ms)"), ("p99_e2el_ms", "E2E p99 (ms)"),
    ("request_throughput", "requests/s"), ("output_throughput", "output tok/s"), ("request_goodput", "goodput req/s"),
]  # fmt: skip


def main(argv=None) -> dict:
    from cluster.cluster import Cluster
    from cluster.config import ServeConfig
    from engine.config import EngineConfig

    parser = argparse.ArgumentParser(prog="pdserve bench compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, ("interference", "sharegpt", "random"), num_prompts=40, request_rate=2.0)
    parser.add_argument("--workers", type=int, default=2, help="worker processes in each mode (even)")
    parser.add_argument("--transfer", default="auto")
    parser.add_argument("--model")
    parser.add_argument("--kv-cache-gb", type=float, default=0.5)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--address", help="run on this Ray cluster instead of a local one")
    parser.add_argument("--json", help="write {colocated: {...}, disaggregated: {...}} here")
    parser.add_argument("--plot", help="write a PNG here")
    args = parser.parse_args(argv)
    if args.workers < 2 or args.workers % 2:
        parser.error("--workers must be an even number >= 2")

    engine = EngineConfig(model=args.model, kv_cache_gb=args.kv_cache_gb, max_model_len=args.max_model_len)
    percentiles = [float(p) for p in args.percentiles.split(",")]
    goodput = parse_goodput(args.goodput)
    with bench_ray(args.address):
        modes = {
            "colocated": ServeConfig(engine=engine, colocated=args.workers, port=0),
            "disaggregated": ServeConfig(engine=engine, prefill=args.workers // 2, decode=args.workers // 2, transfer=args.transfer, port=0),
        }
        requests, report = None, {}
        for mode, config in modes.items():
            cluster = Cluster(config).start()
            try:
                endpoint = Endpoint("grpc", cluster.target)
                if requests is None:
                    requests = workload(args, endpoint, local_tokenizer(args.model) if args.dataset == "sharegpt" else None)
                print(f"\n{mode}: {cluster.config.num_workers} workers, {len(requests)} requests")
                outputs, duration = asyncio.run(run_load(
                    endpoint, requests, args.request_rate, args.burstiness, args.max_concurrency,
                    args.cancel_rate, args.ignore_eos, args.seed))  # fmt: skip
                report[mode] = calculate_metrics(outputs, duration, percentiles, goodput)
            finally:
                cluster.stop()
    report["workload"] = {"dataset": args.dataset, "num_prompts": len(requests), "request_rate": args.request_rate,
                          "workers": args.workers, "transfer": modes["disaggregated"].resolve().transfer}  # fmt: skip
    _print(report)
    save_json(args.json, report)
    if args.plot:
        plot(report, args.plot)
    return report


def _print(report: dict) -> None:
    w = report["workload"]
    print(f"\n{w['dataset']} workload, {w['num_prompts']} requests at {w['request_rate']} req/s, "
          f"{w['workers']} workers per mode (disaggregated: {w['workers'] // 2}P + {w['workers'] // 2}D, {w['transfer']})")  # fmt: skip
    print(f"{'':<18}{'colocated':>14}{'disaggregated':>16}")
    for key, label in COLUMNS:
        c, d = report["colocated"].get(key), report["disaggregated"].get(key)
        if c is None or d is None:
            continue
        print(f"{label:<18}{c:>14.2f}{d:>16.2f}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = [("p99_ttft_ms", "TTFT p99"), ("median_itl_ms", "ITL p50"), ("p99_itl_ms", "ITL p99"), ("p99_tpot_ms", "TPOT p99")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(latency))
    for i, mode in enumerate(("colocated", "disaggregated")):
        left.bar(x + (i - 0.5) * 0.38, [report[mode][k] for k, _ in latency], 0.38, label=mode)
        right.bar(i, report[mode]["output_throughput"], 0.6, label=mode, color=f"C{i}")
    left.set(xticks=x, xticklabels=[label for _, label in latency], ylabel="ms", yscale="log", title="latency (lower is better)")
    right.set(xticks=[0, 1], xticklabels=["colocated", "disagg."], ylabel="output tokens/s", title="throughput")
    left.legend()
    w = report["workload"]
    fig.suptitle(f"{w['dataset']} workload, {w['num_prompts']} requests at {w['request_rate']} req/s, {w['workers']} workers per mode")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

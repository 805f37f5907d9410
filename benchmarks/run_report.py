"""THE run format: what a simulated, a mock-engine and a real run write, so one tool compares them.

    pdserve report A.json [B.json ...] [--plot runs.png] [--json table.json]

A run report is JSON:

  schema, version   "pdserve.run", 1
  kind              "real" | "mock" | "sim"
  config            pools, policy, slo {ttft_ms, itl_ms}, profile, workload (enough to rerun it)
  requests          per request: arrival (s), input_len, output_len, status, ttft_ms, e2e_ms,
                    itl_mean_ms, met_slo (left out past `max_records`; `requests_omitted` says so;
                    a sampled simulation, config.shards > 1, records its shard's requests only)
  timeline          per `step` seconds: t, offered_rate and finished (req/s), pools and targets
                    (workers per role), ttft_ms and itl_ms {p50, p90}, slo_attainment, queued
                    prompt tokens, kv_usage
  decisions         the planner's: at, role, current, target, direction, reason, detail
  summary           see `summarize`

Definitions (one for every kind of run):
  status        ok | rejected (the admission queue was full) | timeout (no KV room in time) | failed
  TTFT          arrival to the first streamed token
  ITL           the time per streamed token after the first: a response that carries k tokens
                counts as k gaps of 1/k of the time since the previous one (as SGLang's
                bench_serving counts them); the percentiles weigh every gap (a simulator gives
                (time, gap, count) runs of equal gaps, one a decode step)
  itl_mean      (E2E - TTFT) / (output tokens - 1): vLLM's TPOT, a request's mean ITL
  met_slo       ok, TTFT <= SLO and itl_mean <= SLO (a one-token reply meets the ITL SLO)
  SLO attainment  met / all requests (rejected and failed count as missed)
  goodput       met requests per second of the run; per worker-second: met / worker-seconds,
                where worker-seconds integrate every worker that holds a device (starting,
                ready or draining)
  percentiles   the inverted CDF: the smallest value with at least q% of the weight at or below it
  timeline bins TTFT by first-token time, ITL by the gap's time, SLO attainment by arrival time
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

import numpy as np

SCHEMA, VERSION = "pdserve.run", 1
KINDS = ("real", "mock", "sim")
STATUSES = ("ok", "rejected", "timeout", "failed")
MAX_RECORDS = 200_000
ROLE_STYLE = {"prefill": "tab:blue", "decode": "tab:orange", "colocated": "tab:green"}


def percentile(values, q: float, weights=None) -> float | None:
    """The smallest value with at least q% of the (weighted) total at or below it; None if empty."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return None
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(w[order])
    if cum[-1] <= 0:
        return None
    i = int(np.searchsorted(cum, q / 100 * cum[-1] * (1 - 1e-12), side="left"))
    return float(v[order][min(i, v.size - 1)])


def _stats(values, weights=None, qs=(50, 90, 99)) -> dict:
    v = np.asarray(values, dtype=float)
    out = {f"p{q}": percentile(v, q, weights) for q in qs}
    if v.size:
        w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
        out["mean"] = float((v * w).sum() / w.sum()) if w.sum() > 0 else None
    else:
        out["mean"] = None
    return out


def met_slo(status, ttft_ms, itl_mean_ms, slo_ttft_ms: float, slo_itl_ms: float) -> np.ndarray:
    status, ttft, itl = np.asarray(status), np.asarray(ttft_ms, dtype=float), np.asarray(itl_mean_ms, dtype=float)
    ok = status == "ok"
    with np.errstate(invalid="ignore"):
        return ok & (np.nan_to_num(ttft, nan=np.inf) <= slo_ttft_ms) & (np.isnan(itl) | (itl <= slo_itl_ms))


class Columns:
    """Per-request results as columns (cheap for millions of requests). Latencies in seconds;
    NaN where there is none (a rejected request, a one-token reply's ITL)."""

    FIELDS = ("arrival", "input_len", "output_len", "ttft", "e2e", "itl_mean")

    def __init__(self):
        self.data: dict[str, list] = {f: [] for f in self.FIELDS}
        self.status: list[str] = []

    def add(self, arrival: float, input_len: int, output_len: int, status: str,
            ttft: float = math.nan, e2e: float = math.nan) -> None:  # fmt: skip
        d = self.data
        d["arrival"].append(arrival)
        d["input_len"].append(input_len)
        d["output_len"].append(output_len)
        d["ttft"].append(ttft)
        d["e2e"].append(e2e)
        d["itl_mean"].append((e2e - ttft) / (output_len - 1) if status == "ok" and output_len > 1 else math.nan)
        self.status.append(status)

    def __len__(self) -> int:
        return len(self.status)

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns as arrays, in arrival order."""
        out = {f: np.asarray(v, dtype=float) for f, v in self.data.items()}
        out["status"] = np.asarray(self.status, dtype=object)
        order = np.argsort(out["arrival"], kind="stable")
        return {k: v[order] for k, v in out.items()}

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "Columns":
        """From report records (milliseconds) back to columns (seconds)."""
        c = cls()
        for r in records:
            c.add(r["arrival"], r["input_len"], r["output_len"], r["status"], _s(r.get("ttft_ms")), _s(r.get("e2e_ms")))
        return c


def _s(ms) -> float:
    return math.nan if ms is None else ms / 1000


def _ms(seconds: float) -> float | None:
    return None if seconds is None or math.isnan(seconds) else round(seconds * 1000, 3)


# --- building a report ---------------------------------------------------------------------------


def summarize(cols: dict, itl: dict | None, slo: dict, duration: float, worker_seconds: float, scale: int = 1) -> dict:
    """The summary of a run from its request columns (`Columns.arrays()`) and ITL runs
    ({"t", "value", "count"}, seconds; None: each request's itl_mean counts for its gaps).
    `scale`: each request recorded stands for that many of the cluster's (a sampled run,
    simulator/shards.py), so counts and rates are multiplied by it; shares and latencies are not,
    and `worker_seconds` must already be the cluster's."""
    status, n = cols["status"], len(cols["status"])
    met = met_slo(status, cols["ttft"] * 1000, cols["itl_mean"] * 1000, slo["ttft_ms"], slo["itl_ms"])
    ok = status == "ok"
    gaps, weights = _itl_samples(cols, itl)
    out_tokens = float(cols["output_len"][ok].sum()) * scale
    good = float(met.sum()) * scale
    return {
        "requests": n * scale,
        **{s: int((status == s).sum()) * scale for s in STATUSES},
        "duration_s": duration,
        "slo_attainment": float(met.mean()) if n else None,
        "goodput_rps": good / duration if duration > 0 else None,
        "throughput_rps": float(ok.sum()) * scale / duration if duration > 0 else None,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else None,
        "worker_seconds": worker_seconds,
        "goodput_per_worker_second": good / worker_seconds if worker_seconds > 0 else None,
        "ttft_ms": _stats(cols["ttft"][ok] * 1000),
        "itl_ms": _stats(gaps * 1000, weights),
        "itl_mean_ms": _stats(cols["itl_mean"][ok & ~np.isnan(cols["itl_mean"])] * 1000),
        "e2e_ms": _stats(cols["e2e"][ok] * 1000),
    }


def _itl_samples(cols: dict, itl: dict | None) -> tuple[np.ndarray, np.ndarray]:
    if itl is not None:
        return np.asarray(itl["value"], dtype=float), np.asarray(itl["count"], dtype=float)
    keep = (cols["status"] == "ok") & ~np.isnan(cols["itl_mean"])
    return cols["itl_mean"][keep], cols["output_len"][keep] - 1


def _itl_times(cols: dict, itl: dict | None) -> np.ndarray:
    if itl is not None:
        return np.asarray(itl["t"], dtype=float)
    keep = (cols["status"] == "ok") & ~np.isnan(cols["itl_mean"])
    return (cols["arrival"] + cols["e2e"])[keep]


def timeline(cols: dict, itl: dict | None, samples: Sequence[dict], slo: dict, duration: float, step: float = 1.0,
             scale: int = 1) -> list[dict]:  # fmt: skip
    """Per `step` seconds of the run. `samples`: {t, pools, targets, queued_prompt_tokens,
    kv_usage} as the run observed them (the last one in a bin stands for it). `scale`: as summarize's."""
    bins = max(1, math.ceil(duration / step))
    arrival = cols["arrival"]
    status = cols["status"]
    ok = status == "ok"
    met = met_slo(status, cols["ttft"] * 1000, cols["itl_mean"] * 1000, slo["ttft_ms"], slo["itl_ms"])
    a_bin = np.minimum((arrival // step).astype(int), bins - 1)
    offered = np.bincount(a_bin, minlength=bins)
    met_by = np.bincount(a_bin, weights=met.astype(float), minlength=bins)
    f_bin = _bin((arrival + cols["e2e"])[ok], step, bins)
    finished = np.bincount(f_bin, minlength=bins)
    ttft_bin = _bin((arrival + cols["ttft"])[ok], step, bins)
    ttft_by = _grouped(ttft_bin, cols["ttft"][ok] * 1000, None, bins)
    gaps, weights = _itl_samples(cols, itl)
    itl_by = _grouped(_bin(_itl_times(cols, itl), step, bins), gaps * 1000, weights, bins)
    by_sample = {}
    for s in samples:
        by_sample[min(int(s["t"] // step), bins - 1)] = s
    rows, last = [], {}
    for b in range(bins):
        last = by_sample.get(b, last)
        rows.append({
            "t": round(b * step, 6),
            "offered_rate": float(offered[b] * scale / step),
            "finished": float(finished[b] * scale / step),
            "pools": last.get("pools", {}),
            "targets": last.get("targets", {}),
            "ttft_ms": ttft_by[b],
            "itl_ms": itl_by[b],
            "slo_attainment": float(met_by[b] / offered[b]) if offered[b] else None,
            "queued_prompt_tokens": last.get("queued_prompt_tokens"),
            "kv_usage": last.get("kv_usage"),
        })  # fmt: skip
    return rows


def _bin(times: np.ndarray, step: float, bins: int) -> np.ndarray:
    return np.clip((np.asarray(times, dtype=float) // step).astype(int), 0, bins - 1)


def _grouped(bins_of: np.ndarray, values: np.ndarray, weights, bins: int) -> list[dict]:
    """{p50, p90} of the values in each bin (None where a bin has none)."""
    out = [{"p50": None, "p90": None} for _ in range(bins)]
    if len(values) == 0:
        return out
    w = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=float)
    order = np.lexsort((values, bins_of))
    b, v, w = bins_of[order], values[order], w[order]
    edges = np.searchsorted(b, np.arange(bins + 1))
    for i in np.nonzero(edges[1:] > edges[:-1])[0]:
        lo, hi = edges[i], edges[i + 1]
        cum = np.cumsum(w[lo:hi])
        if cum[-1] <= 0:
            continue
        pick = lambda q: float(v[lo + min(int(np.searchsorted(cum, q * cum[-1] * (1 - 1e-12))), hi - lo - 1)])  # noqa: E731
        out[i] = {"p50": pick(0.5), "p90": pick(0.9)}
    return out


def make_report(kind: str, config: dict, columns: Columns, samples: Sequence[dict], duration: float,
                worker_seconds: float, decisions: Sequence[dict] = (), itl: dict | None = None,
                step: float = 1.0, max_records: int = MAX_RECORDS, extra: dict | None = None, scale: int = 1) -> dict:  # fmt: skip
    """A whole run report. config["slo"] = {ttft_ms, itl_ms} is required. `scale`: as summarize's
    (the per-request records are then a sample of the cluster's)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    slo = config["slo"]
    cols = columns.arrays()
    report = {
        "schema": SCHEMA, "version": VERSION, "kind": kind, "config": config,
        "summary": summarize(cols, itl, slo, duration, worker_seconds, scale),
        "timeline": timeline(cols, itl, samples, slo, duration, step, scale),
        "decisions": list(decisions),
    }  # fmt: skip
    if len(columns) <= max_records:
        met = met_slo(cols["status"], cols["ttft"] * 1000, cols["itl_mean"] * 1000, slo["ttft_ms"], slo["itl_ms"])
        report["requests"] = [
            {"arrival": round(float(cols["arrival"][i]), 6), "input_len": int(cols["input_len"][i]),
             "output_len": int(cols["output_len"][i]), "status": cols["status"][i], "ttft_ms": _ms(cols["ttft"][i]),
             "e2e_ms": _ms(cols["e2e"][i]), "itl_mean_ms": _ms(cols["itl_mean"][i]), "met_slo": bool(met[i])}
            for i in range(len(columns))
        ]  # fmt: skip
    else:
        report["requests"], report["requests_omitted"] = [], len(columns)
    report.update(extra or {})
    return report


def load(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    if report.get("schema") != SCHEMA or report.get("version") != VERSION:
        raise ValueError(f"{path}: not a pdserve run report (schema {report.get('schema')!r}, version {report.get('version')!r})")
    return report


def save(report: dict, path: str) -> None:
    from benchmarks.provenance import provenance

    with open(path, "w") as f:
        json.dump({**report, "provenance": provenance()}, f, indent=1, default=_jsonable)


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


# --- tables and plots ----------------------------------------------------------------------------

COLUMNS = [
    ("kind", lambda r: r["kind"]), ("pools", lambda r: _pools(r["config"])),
    ("SLO att.", lambda r: _pct(r["summary"]["slo_attainment"])),
    ("goodput r/s", lambda r: _num(r["summary"]["goodput_rps"])),
    ("thru r/s", lambda r: _num(r["summary"]["throughput_rps"])),
    ("worker-s", lambda r: _num(r["summary"]["worker_seconds"], 0)),
    ("good/wkr-s", lambda r: _num(r["summary"]["goodput_per_worker_second"], 3)),
    ("TTFT p50", lambda r: _num(r["summary"]["ttft_ms"]["p50"], 0)), ("TTFT p90", lambda r: _num(r["summary"]["ttft_ms"]["p90"], 0)),
    ("ITL p50", lambda r: _num(r["summary"]["itl_ms"]["p50"], 1)), ("ITL p90", lambda r: _num(r["summary"]["itl_ms"]["p90"], 1)),
    ("failed", lambda r: str(sum(r["summary"][s] for s in STATUSES[1:]))),
]  # fmt: skip


def _pools(config: dict) -> str:
    pools = config.get("pools", {})
    text = "/".join(f"{pools[k]}{k[0].upper()}" for k in ("prefill", "decode", "colocated") if pools.get(k))
    if config.get("shards", 1) > 1:
        text += f" (1/{config['shards']} simulated)"
    return text + (f" +{config['policy']}" if config.get("policy") else "")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(reports: dict[str, dict]) -> str:
    """Runs side by side, one row each."""
    head = ["run"] + [name for name, _ in COLUMNS]
    rows = [[label] + [fn(r) for _, fn in COLUMNS] for label, r in reports.items()]
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in [head, *rows])  # fmt: skip


def plot(reports: dict[str, dict], path: str) -> None:
    """Load, replicas, SLO attainment and p90 latencies over time, one shared time axis. One run:
    a colour per series; several: a colour per run, a line style per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    many = len(reports) > 1
    run_colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, r) in enumerate(reports.items()):
        tl = r["timeline"]
        t = [row["t"] for row in tl]
        tag = f" ({label})" if many else ""

        def draw(ax, values, style, color, name, step=False):
            c = run_colors[k % len(run_colors)] if many else color
            values = [math.nan if v is None else v for v in values]
            (ax.step if step else ax.plot)(t, values, style, color=c, label=name + tag, **({"where": "post"} if step else {}))

        if not many or k == 0:
            draw(axes[0], _smooth([row["offered_rate"] for row in tl]), "-", "black", "offered")
        draw(axes[0], _smooth([row["finished"] for row in tl]), "--" if many else "-", "tab:purple", "finished")
        for (role, color), style in zip(ROLE_STYLE.items(), ("-", "--", ":")):
            sizes = [row["pools"].get(role) for row in tl]
            if any(s is not None for s in sizes):
                draw(axes[1], sizes, style, color, role, step=True)
        draw(axes[2], [row["slo_attainment"] for row in tl], "-", "tab:red", "SLO attainment")
        for (name, color), style in zip((("ttft_ms", "tab:blue"), ("itl_ms", "tab:orange")), ("-", "--")):
            draw(axes[3], [row[name]["p90"] for row in tl], style, color, f"{name[:-3].upper()} p90")
    slo = next(iter(reports.values()))["config"]["slo"]
    axes[3].axhline(slo["ttft_ms"], color="gray", lw=0.8, ls="-")
    axes[3].axhline(slo["itl_ms"], color="gray", lw=0.8, ls="--")
    axes[3].set_yscale("log")
    for ax, label in zip(axes, ("requests/s (5 s mean)", "ready workers", "SLO attainment (by arrival)", "ms (gray: SLOs)")):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", ncol=2 if many else 1)
    axes[2].set_ylim(-0.02, 1.02)
    axes[-1].set_xlabel("seconds")
    fig.suptitle(" vs ".join(reports) if many else next(iter(reports)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    v = np.asarray(values, dtype=float)
    if v.size < window:
        return v.tolist()
    return np.convolve(v, np.ones(window) / window, mode="same").tolist()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pdserve report", description="Tabulate run reports side by side; overlay their timelines.")
    parser.add_argument("reports", nargs="+", help="run report JSON files (pdserve sim --out, pdserve bench autoscale)")
    parser.add_argument("--plot", help="write the overlaid timelines to this PNG")
    parser.add_argument("--json", help="write the summaries side by side to this file")
    args = parser.parse_args(argv)
    reports = {}
    for path in args.reports:
        label = path if path not in reports else f"{path}#{len(reports)}"
        reports[label] = load(path)
    print(table(reports))
    if args.plot:
        plot(reports, args.plot)
        print(f"plot: {args.plot}")
    summaries = {label: {"kind": r["kind"], "config": r["config"], "summary": r["summary"]} for label, r in reports.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summaries, f, indent=2)
    return summaries


if __name__ == "__main__":
    main()

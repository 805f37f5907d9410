"""Prometheus metrics of a cluster, served by the router on a port of their own (--metrics-port).

vLLM's names where the meaning matches, `pdserve_` for what is ours. Series are labelled with
the worker they are about (`role`, `worker`), never with a request id (unbounded cardinality).

  measured by the router, per request, labelled with the decode (or colocated) worker:
    vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, vllm:e2e_request_latency_seconds
  the router's own, per request:
    pdserve_request_phase_seconds{phase}   time spent in each phase of a request's timeline
                                           (queue, prefill_queue, prefill, transfer, decode, recovery)
    pdserve_migrations_total{reason}       requests moved to another worker after their first token
    pdserve_retries_total{reason}          requests placed again before their first token
    pdserve_requests_refused_total{reason} requests refused at admission (queue_full, shutting_down)
    pdserve_requests_waiting               requests waiting in the router's admission queue
  from each worker's stats (refreshed every few seconds):
    vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc,
    vllm:prefix_cache_queries, vllm:prefix_cache_hits, vllm:num_preemptions,
    pdserve_kv_blocks{state}, pdserve_kv_blocks_reserved,
    pdserve_kv_transfer_seconds, pdserve_kv_transfer_bytes,
    pdserve_kv_transfer_failures{reason}: "send" on prefill workers (a transfer that failed or was
      cancelled), on decode workers what the KV receiver refused (kv_transfer.wire.REASONS)
  pool sizes: pdserve_workers{role, state}
  the autoscaling planner (serve --autoscale):
    pdserve_planner_target_workers{role}                      the pool sizes it last asked for
    pdserve_planner_decisions_total{role, direction, reason}  its decisions (direction up/down/hold)
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LABELS = ("role", "worker")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()

        def histogram(name, doc):
            return Histogram(name, doc, LABELS, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Time per streamed token after the first (k tokens that arrive together: k gaps of 1/k the time).")
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Time from request arrival to its last token.")
        r = self.registry
        self.phase = Histogram("pdserve_request_phase_seconds", "Time requests spend in each phase of their lifetime.",
                               ["phase"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.migrations = Counter("pdserve_migrations", "Requests moved to another worker after their first token.",
                                  ["reason"], registry=r)  # fmt: skip
        self.retries = Counter("pdserve_retries", "Requests placed again before their first token.", ["reason"], registry=r)
        self.refused = Counter("pdserve_requests_refused", "Requests refused at admission.", ["reason"], registry=r)
        self.waiting = Gauge("pdserve_requests_waiting", "Requests waiting in the router's admission queue.", registry=r)
        self.planner_targets = Gauge("pdserve_planner_target_workers", "Workers per pool the planner last asked for.", ["role"],
                                     registry=r)  # fmt: skip
        self.planner_decisions = Counter("pdserve_planner_decisions", "The planner's decisions, per pool.",
                                         ["role", "direction", "reason"], registry=r)  # fmt: skip
        self.workers: list[dict] = []  # latest stats of every worker (the router refreshes them)
        self.registry.register(_WorkerCollector(self))
        self._server = None
        self._latencies: dict[tuple[str, str], tuple] = {}

    def latencies(self, role: str, worker: str) -> tuple:
        """One worker's (ttft, itl, e2e) series, looked up once (labels() costs more than an observation)."""
        series = self._latencies.get((role, worker))
        if series is None:
            series = self._latencies[role, worker] = tuple(h.labels(role, worker) for h in (self.ttft, self.itl, self.e2e))
        return series

    def forget_worker(self, role: str, worker: str) -> None:
        if self._latencies.pop((role, worker), None) is not None:
            for histogram in (self.ttft, self.itl, self.e2e):
                histogram.remove(role, worker)

    def serve(self, host: str, port: int) -> int:
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _WorkerCollector:
    """Turns the latest worker stats into metric families at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        workers = [w for w in self.metrics.workers if "kv_blocks" in w]
        gauge = lambda name, doc, extra=(): GaugeMetricFamily(name, doc, labels=[*LABELS, *extra])  # noqa: E731
        counter = lambda name, doc, extra=(): CounterMetricFamily(name, doc, labels=[*LABELS, *extra])  # noqa: E731
        running = gauge("vllm:num_requests_running", "Requests in the worker's running batch.")
        waiting = gauge("vllm:num_requests_waiting", "Requests queued (or reserved, awaiting KV) on the worker.")
        usage = gauge("vllm:kv_cache_usage_perc", "Fraction of the worker's KV blocks held by live requests.")
        blocks = gauge("pdserve_kv_blocks", "KV blocks of the worker's pool, by state.", ("state",))
        reserved = gauge("pdserve_kv_blocks_reserved", "KV blocks reserved for transfers not yet complete (decode).")
        queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        preemptions = counter("vllm:num_preemptions", "Sequences preempted for lack of KV blocks.")
        transfer_bytes = counter("pdserve_kv_transfer_bytes", "KV bytes shipped to decode workers (prefill).")
        failures = counter("pdserve_kv_transfer_failures", "KV transfers that failed or were cancelled (prefill, reason \"send\"); "
                           "what the KV receiver refused, by reason (decode).", ("reason",))  # fmt: skip
        seconds = HistogramMetricFamily("pdserve_kv_transfer_seconds", "First KV chunk out to acknowledgement (prefill).",
                                        labels=list(LABELS))  # fmt: skip
        for w in workers:
            labels = [w["role"], w["id"]]
            kv = w["kv_blocks"]
            running.add_metric(labels, w["running"])
            waiting.add_metric(labels, w["waiting"])
            usage.add_metric(labels, kv["in_use"] / kv["total"] if kv["total"] else 0.0)
            for state in ("total", "free", "cached", "in_use"):
                blocks.add_metric([*labels, state], kv[state])
            reserved.add_metric(labels, w.get("reserved_blocks", 0))
            queries.add_metric(labels, w["prefix_cache"]["query_tokens"])
            hits.add_metric(labels, w["prefix_cache"]["hit_tokens"])
            preemptions.add_metric(labels, w["preemptions"])
            transfer = w.get("transfer")
            if transfer is not None:
                transfer_bytes.add_metric(labels, transfer["bytes"])
                failures.add_metric([*labels, "send"], transfer["failures"])
                cumulative = [(str(bound), n) for bound, n in transfer["buckets"]]
                seconds.add_metric(labels, [*cumulative, ("+Inf", transfer["count"])], transfer["sum"])
            for reason, n in sorted(w.get("receive_failures", {}).items()):
                failures.add_metric([*labels, reason], n)
        yield from (running, waiting, usage, blocks, reserved, queries, hits, preemptions, transfer_bytes, failures, seconds)
        pools = GaugeMetricFamily("pdserve_workers", "Workers per pool and state.", labels=["role", "state"])
        for (role, state), n in sorted(Tally((w["role"], w["state"]) for w in self.metrics.workers).items()):
            pools.add_metric([role, state], n)
        yield pools

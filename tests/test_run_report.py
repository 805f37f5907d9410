"""The run-report arithmetic on hand-made records, its JSON and plot, `pdserve report`, Chrome traces."""

import json
import math

import pytest

from benchmarks import chrome_trace, run_report
from benchmarks.run_report import Columns

SLO = {"ttft_ms": 500, "itl_ms": 50}


def records() -> Columns:
    c = Columns()
    c.add(0.2, 100, 11, "ok", ttft=0.1, e2e=0.6)  # itl_mean 50 ms: meets both
    c.add(0.5, 200, 11, "ok", ttft=0.6, e2e=1.1)  # TTFT 600 ms: misses
    c.add(1.5, 300, 5, "ok", ttft=0.3, e2e=0.7)  # itl_mean 100 ms: misses
    c.add(1.7, 400, 1, "ok", ttft=0.2, e2e=0.2)  # one token: meets
    c.add(2.5, 500, 9, "rejected")
    return c


def test_summary_by_hand():
    cols = records().arrays()
    itl = {"t": [0.6, 1.0, 2.0], "value": [0.05, 0.05, 0.1], "count": [10, 10, 4]}
    s = run_report.summarize(cols, itl, SLO, duration=4.0, worker_seconds=8.0)
    assert (s["requests"], s["ok"], s["rejected"]) == (5, 4, 1)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["goodput_rps"] == pytest.approx(0.5) and s["throughput_rps"] == pytest.approx(1.0)
    assert s["goodput_per_worker_second"] == pytest.approx(2 / 8)
    assert s["output_tokens_per_s"] == pytest.approx(28 / 4)
    assert s["ttft_ms"]["p50"] == pytest.approx(200) and s["ttft_ms"]["p90"] == pytest.approx(600)  # sorted 100 200 300 600
    assert s["itl_ms"]["p50"] == pytest.approx(50) and s["itl_ms"]["p90"] == pytest.approx(100)  # 20 of 24 gaps at 50 ms
    assert s["itl_ms"]["mean"] == pytest.approx((20 * 50 + 4 * 100) / 24)
    assert s["e2e_ms"]["p99"] == pytest.approx(1100)


def test_percentile_is_the_inverted_cdf():
    assert run_report.percentile([1, 2, 3, 4], 50) == 2
    assert run_report.percentile([1, 2, 3, 4], 51) == 3
    assert run_report.percentile([1, 2], 50, weights=[1, 3]) == 2
    assert run_report.percentile([], 50) is None


def test_timeline_by_hand():
    cols = records().arrays()
    samples = [{"t": 0.0, "pools": {"prefill": 1, "decode": 1}, "targets": {"prefill": 1, "decode": 1}, "queued_prompt_tokens": 0,
                "kv_usage": 0.1}, {"t": 2.0, "pools": {"prefill": 2, "decode": 1}, "targets": {"prefill": 2, "decode": 1},
                "queued_prompt_tokens": 300, "kv_usage": 0.5}]  # fmt: skip
    rows = run_report.timeline(cols, None, samples, SLO, duration=3.0)
    assert [r["offered_rate"] for r in rows] == [2, 2, 1]
    assert [r["slo_attainment"] for r in rows] == [0.5, 0.5, 0.0]  # by arrival second
    assert [r["finished"] for r in rows] == [1, 2, 1]  # ends at 0.8, 1.6, 2.2, 1.9
    assert rows[0]["ttft_ms"] == {"p50": 100, "p90": 100}  # first tokens at 0.3 (A); B's at 1.1
    assert [r["pools"] for r in rows] == [{"prefill": 1, "decode": 1}] * 2 + [{"prefill": 2, "decode": 1}]
    assert rows[1]["kv_usage"] == 0.1 and rows[2]["queued_prompt_tokens"] == 300


def test_report_json_plot_and_compare(tmp_path):
    config = {"slo": SLO, "pools": {"prefill": 1, "decode": 1}, "policy": None}
    report = run_report.make_report("sim", config, records(), [], 3.0, 6.0, [{"at": 1.0, "role": "prefill", "target": 2}])
    assert [r["met_slo"] for r in report["requests"]] == [True, False, False, True, False]
    assert report["requests"][4]["ttft_ms"] is None and math.isclose(report["requests"][0]["itl_mean_ms"], 50)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    run_report.save(report, str(a))
    run_report.save({**report, "kind": "real"}, str(b))
    again = run_report.load(str(a))
    assert again["summary"] == json.loads(json.dumps(report["summary"]))
    assert Columns.from_records(again["requests"]).arrays()["ttft"][:4] == pytest.approx([0.1, 0.6, 0.3, 0.2])
    out = run_report.main([str(a), str(b), "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "t.json")])
    assert set(out) == {str(a), str(b)} and (tmp_path / "p.png").stat().st_size > 0
    omitted = run_report.make_report("sim", config, records(), [], 3.0, 6.0, max_records=2)
    assert omitted["requests"] == [] and omitted["requests_omitted"] == 5
    with pytest.raises(ValueError, match="kind"):
        run_report.make_report("guess", config, records(), [], 3.0, 6.0)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a pdserve run report"):
        run_report.load(str(bad))


def test_chrome_trace(tmp_path):
    spans = [
        chrome_trace.Span(None, "prefill step", 0.0, 0.02, "p0", {"tokens": 100}),
        chrome_trace.Span("r1", "prefill", 0.0, 0.02, "p0"),
        chrome_trace.Span("r1", "decode", 0.03, 0.08, "d1"),
        chrome_trace.Span(None, "decode x4 (batch 1)", 0.03, 0.08, "d1"),
        chrome_trace.Span("r2", "queued", 0.01, 0.01),
    ]
    path = tmp_path / "t.json"
    assert chrome_trace.write(spans, str(path), {"kind": "sim"}) == 5
    trace = json.loads(path.read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] in ("process_name", "thread_name")}
    assert names == {"requests", "worker p0", "worker d1", "request r1", "request r2"}
    decode = next(e for e in events if e["name"] == "decode")
    assert decode["ts"] == 30000 and decode["dur"] == 50000 and decode["args"]["worker"] == "d1"
    assert len({e["pid"] for e in events if e["cat"] == "worker"}) == 2
    assert len({e["tid"] for e in events if e["cat"] == "request"}) == 2


def test_a_real_runs_timeline_becomes_trace_spans():
    from benchmarks.chrome_trace import Span, timeline_spans

    timeline = [{"name": n, "seconds": t, "worker": w} for n, t, w in [
        ("arrived", 0.0, ""), ("reserved", 0.1, "d0"), ("prefill_queued", 0.1, "p0"), ("prefill_started", 0.2, "p0"),
        ("prefill_ended", 0.5, "p0"), ("first_token", 0.6, "d0"), ("migrated", 1.0, "d0"), ("reserved", 1.2, "d1"),
        ("first_token", 1.9, "d1"), ("finished", 2.5, "d1")]]  # fmt: skip
    spans = timeline_spans("r", 10.0, timeline)
    assert spans == [Span("r", "queue", 10.0, 10.1, "d0"), Span("r", "prefill_queue", 10.1, 10.2, "p0"),
                     Span("r", "prefill", 10.2, 10.5, "p0"), Span("r", "decode", 10.6, 11.0, "d0"), Span("r", "queue", 11.0, 11.2, "d0"),
                     Span("r", "recovery", 11.0, 11.9, "d0"), Span("r", "decode", 11.9, 12.5, "d1")]  # fmt: skip

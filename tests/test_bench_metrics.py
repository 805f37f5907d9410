"""The serving benchmark's arithmetic, on synthetic timestamps against hand-computed values."""

import numpy as np
import pytest

from benchmarks.serve import RequestOutput, arrival_offsets, calculate_metrics, parse_goodput

# A: 5 tokens, first after 100 ms, then gaps of 50, 50, 100, 100 ms -> latency 400 ms, TPOT 75 ms
# B: 1 token after 200 ms -> no TPOT (counted as 0 for goodput)
# C: failed; D: cancelled mid-stream. Duration 2 s.
A = RequestOutput(prompt_len=10, success=True, output_tokens=5, ttft=0.1, itl=[0.05, 0.05, 0.1, 0.1], latency=0.4)
B = RequestOutput(prompt_len=20, success=True, output_tokens=1, ttft=0.2, latency=0.2)
C = RequestOutput(prompt_len=5, error="UNAVAILABLE: no decode worker")
D = RequestOutput(prompt_len=7, cancelled=True, output_tokens=3, ttft=0.1, itl=[0.02, 0.02])


def metrics(goodput=None):
    return calculate_metrics([A, B, C, D], duration=2.0, percentiles=[50, 90, 99], goodput=goodput or {})


def test_counts_and_throughputs():
    m = metrics()
    assert (m["completed"], m["failed"], m["cancelled"]) == (2, 1, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 6)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0 and m["total_token_throughput"] == 18.0
    assert m["request_goodput"] is None


def test_latency_statistics():
    m = metrics()
    assert m["mean_ttft_ms"] == pytest.approx(150) and m["median_ttft_ms"] == pytest.approx(150)
    assert m["std_ttft_ms"] == pytest.approx(50) and m["p99_ttft_ms"] == pytest.approx(199)
    assert m["mean_tpot_ms"] == pytest.approx(75) and m["p50_tpot_ms"] == pytest.approx(75)  # B has no TPOT
    assert m["mean_itl_ms"] == pytest.approx(75) and m["median_itl_ms"] == pytest.approx(75)  # D's gaps left out
    assert m["p90_itl_ms"] == pytest.approx(100)
    assert m["mean_e2el_ms"] == pytest.approx(300) and m["p50_e2el_ms"] == pytest.approx(300)


def test_goodput_counts_requests_meeting_every_slo():
    assert metrics({"ttft": 150})["request_goodput"] == 0.5  # A (100 ms) yes, B (200 ms) no
    assert metrics({"ttft": 250, "tpot": 70})["request_goodput"] == 0.5  # A fails TPOT (75), B passes
    assert metrics({"ttft": 250, "tpot": 80, "e2el": 500})["request_goodput"] == 1.0
    assert metrics({"e2el": 100})["request_goodput"] == 0.0


def test_nothing_completed_gives_zeros_not_errors():
    m = calculate_metrics([C, D], duration=1.0, percentiles=[99], goodput={"ttft": 1})
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0 and m["request_goodput"] == 0


def test_arrivals_span_num_over_rate_and_burstiness_shapes_the_gaps():
    offsets = arrival_offsets(200, request_rate=10, burstiness=1.0, seed=0)
    assert offsets[-1] == pytest.approx(20.0) and all(b >= a for a, b in zip(offsets, offsets[1:]))
    assert arrival_offsets(5, float("inf"), 1.0, 0) == [0.0] * 5

    def cv(burstiness):  # coefficient of variation of the gaps: 1 / sqrt(shape) for gamma arrivals
        gaps = np.diff([0.0] + arrival_offsets(4000, 10, burstiness, seed=1))
        return gaps.std() / gaps.mean()

    assert cv(1.0) == pytest.approx(1.0, abs=0.1)
    assert cv(0.25) == pytest.approx(2.0, abs=0.25)
    assert cv(4.0) == pytest.approx(0.5, abs=0.06)


def test_goodput_flag_parsing():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(ValueError, match="ttft:MS"):
        parse_goodput(["latency:5"])

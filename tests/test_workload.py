"""Workloads: seeded, the rates they promise on average, both trace formats, the scale knobs."""

import math

import pytest

from benchmarks import workload as wl
from benchmarks.workload import Lengths, Mix, Request, Trace, Workload

ONE_KIND = (Mix(1.0, Lengths(100), Lengths(10)),)


def test_same_seed_same_requests_other_seed_others():
    a = list(wl.named("chat", duration=30, seed=1).requests())
    assert a == list(wl.named("chat", duration=30, seed=1).requests())
    assert a != list(wl.named("chat", duration=30, seed=2).requests())
    assert all(x.time < y.time for x, y in zip(a, a[1:]))


@pytest.mark.parametrize(
    "pattern, params, expected",
    [
        ("constant", {"rate": 50}, lambda t: 50),
        ("step", {"low": 10, "high": 80, "start": 100, "end": 200}, lambda t: 80 if 100 <= t < 200 else 10),
        ("ramp", {"low": 0, "high": 60, "over": 300}, lambda t: 60 * t / 300),
        ("spike", {"base": 10, "peak": 110, "at": 150, "width": 100}, lambda t: 10 + 100 * max(0, 1 - abs(t - 150) / 50)),
        ("diurnal", {"mean": 40, "amplitude": 0.5, "period": 300}, lambda t: 40 * (1 - 0.5 * math.cos(2 * math.pi * t / 300))),
    ],
)
def test_arrivals_follow_the_rate_on_average(pattern, params, expected):
    w = Workload(pattern, 300, params, ONE_KIND, seed=7)
    times = [r.time for r in w.requests()]
    for lo, hi in ((0, 100), (100, 200), (200, 300)):
        mean = sum(expected(lo + (hi - lo) * (i + 0.5) / 1000) for i in range(1000)) / 1000 * (hi - lo)
        got = sum(lo <= t < hi for t in times)
        assert abs(got - mean) <= 4 * math.sqrt(mean) + 1, (lo, hi, got, mean)  # Poisson: within 4 sigma


def test_scales():
    base = Workload("constant", 100, {"rate": 20}, ONE_KIND, seed=3)
    n = len(list(base.requests()))
    faster = list(Workload("constant", 100, {"rate": 20}, ONE_KIND, seed=3, rate_scale=3).requests())
    assert abs(len(faster) - 3 * n) < 4 * math.sqrt(3 * n)
    stretched = list(Workload("constant", 100, {"rate": 20}, ONE_KIND, seed=3, time_scale=2).requests())
    assert max(r.time for r in stretched) > 150 and abs(len(stretched) - n) < 4 * math.sqrt(n)


def test_lengths_and_prefixes():
    mix = (Mix(1.0, Lengths(500, 0.5, 64, 2000), Lengths(100, 0.8, 1, 400), prefixes=3, prefix_len=128),)
    reqs = list(Workload("constant", 200, {"rate": 20}, mix, seed=1).requests())
    ins = [r.input_len for r in reqs]
    assert 64 <= min(ins) and max(ins) <= 2000 and 440 < sum(ins) / len(ins) < 560
    assert {r.prefix_id for r in reqs} == {0, 1, 2} and all(r.prefix_len == 128 < r.input_len for r in reqs)
    with pytest.raises(ValueError, match="needs parameter"):
        Workload("step", 10, {"low": 1})
    with pytest.raises(ValueError, match="no workload"):
        wl.named("nope")


def test_jsonl_round_trip_and_replay(tmp_path):
    path = tmp_path / "w.jsonl"
    reqs = list(wl.named("interference", duration=20, seed=5).requests())
    assert wl.write_jsonl(reqs, str(path)) == len(reqs)
    back = list(Trace(str(path)).requests())
    assert [(r.input_len, r.output_len, r.prefix_id, r.prefix_len) for r in back] == [
        (r.input_len, r.output_len, r.prefix_id, r.prefix_len) for r in reqs
    ]
    assert [r.time for r in back] == pytest.approx([r.time for r in reqs], abs=1e-9)
    half = list(Trace(str(path), rate_scale=2, duration=5).requests())
    assert half and all(r.time < 5 for r in half) and half[0].time == pytest.approx(reqs[0].time / 2)
    assert wl.from_dict(wl.named("chat", seed=4).to_dict()) == wl.named("chat", seed=4)


def test_azure_csv(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:47.0000000,879,0\n"
    )
    reqs = list(Trace(str(path)).requests())
    assert reqs == [Request(0.0, 374, 44), Request(pytest.approx(0.31941), 879, 1), Request(pytest.approx(4.314579), 396, 109)]
    with pytest.raises(ValueError, match="not a trace line"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"timestamp": 1}\n')
        list(Trace(str(bad)).requests())

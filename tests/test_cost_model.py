"""The cost model on hand-computed grids: interpolation inside, extrapolation outside, mixed
steps, transfers, JSON round trips and refusals; the shipped profiles; no torch imported."""

import dataclasses
import json
import subprocess
import sys

import pytest

from engine.cost_model import DEFAULT_PROFILE, PROFILES_DIR, CostProfile, Grid, KVSpec, Link, load_profile, profile_path

PREFILL = Grid((16, 64, 256), (0, 1024), ((0.010, 0.020), (0.020, 0.040), (0.080, 0.120)))
DECODE = Grid((1, 8), (100, 1100), ((0.005, 0.007), (0.008, 0.016)))


def make_profile(**changes) -> CostProfile:
    profile = CostProfile(
        name="hand", source="derived", model="m", hardware="h", kv=KVSpec(4, 2, 8, "bfloat16"), prefill=PREFILL,
        decode=DECODE, step_overhead_seconds=0.004, startup_seconds=1.5, transfer={"grpc": Link(0.002, 1e9)},
        kv_capacity_tokens=4096, details={"sources": ["by hand"]},
    )  # fmt: skip
    return dataclasses.replace(profile, **changes)


@pytest.mark.parametrize(
    "tokens, context, seconds",
    [
        (16, 0, 0.010),  # a grid point
        (40, 0, 0.015),  # halfway between 16 and 64 tokens
        (64, 512, 0.030),  # halfway between contexts 0 and 1024
        (160, 512, 0.065),  # bilinear: rows 64 -> 0.030, 256 -> 0.100 at context 512, then halfway
        (512, 0, 0.160),  # above the grid: the last segment's slope (0.06 s / 192 tokens) continues
        (16, 2048, 0.030),  # above in context too
        (1, 0, 0.010),  # below the grid: the first value holds
        (0, 0, 0.0),  # nothing to compute
    ],
)
def test_prefill_seconds(tokens, context, seconds):
    assert make_profile().prefill_seconds(tokens, context) == pytest.approx(seconds)


def test_decode_seconds_by_batch_and_total_context():
    p = make_profile()
    assert p.decode_seconds(8, 8 * 600) == pytest.approx(0.012)  # mean context 600: halfway along batch 8's row
    assert p.decode_seconds(4, 4 * 100) == pytest.approx(0.005 + 3 / 7 * 0.003)
    assert p.decode_seconds(1, 100) == pytest.approx(0.005)
    assert p.decode_seconds(0, 0) == 0.0


def test_extrapolation_never_falls():
    falling = Grid((1, 2), (0,), ((0.02,), (0.01,)))  # noise can make a measured segment fall
    assert falling(1.5, 0) == pytest.approx(0.015)
    assert falling(10, 0) == pytest.approx(0.01)


def test_mixed_step_pays_the_step_overhead_once():
    p = make_profile()
    assert p.step_seconds([(64, 0)], 8, 4800) == pytest.approx(0.020 + 0.012 - 0.004)
    assert p.step_seconds([(16, 0), (16, 0)], 0, 0) == pytest.approx(0.016)
    assert p.step_seconds([(64, 0)], 0, 0) == p.prefill_seconds(64)
    assert p.step_seconds([], 8, 4800) == p.decode_seconds(8, 4800)
    assert p.step_seconds([], 0, 0) == 0.0
    # Never less than the longest part, whatever the overhead claims.
    assert make_profile(step_overhead_seconds=0.02).step_seconds([(16, 0), (16, 0)], 0, 0) == pytest.approx(0.010)


def test_row_padding_prices_the_rows_the_engine_runs():
    """A profile of an engine that pads a step's rows (engine.padding) prices a step with prompt
    chunks at its padded row count, the extra rows as tokens of its largest chunk; a step of
    decodes only, unpadded."""
    p = make_profile(row_padding=True)
    assert p.step_seconds([(41, 0)], 0, 0) == pytest.approx(0.010 + 0.010 * 28 / 48)  # 41 rows run as 44: 28 / 48 of the way from 16 to 64
    assert p.step_seconds([(100, 0)], 0, 0) == p.prefill_seconds(104)
    # 20 + 30 prompt tokens and 5 decodes: 55 rows run as 56, the extra one on the 30-token chunk.
    assert p.step_seconds([(20, 0), (30, 512)], 5, 500) == pytest.approx(
        p.prefill_seconds(20) + p.prefill_seconds(31, 512) + p.decode_seconds(5, 500) - 2 * 0.004)
    assert p.step_seconds([], 40, 4000) == make_profile().step_seconds([], 40, 4000) == p.decode_seconds(40, 4000)
    assert p.step_seconds([(16, 0)], 0, 0) == p.prefill_seconds(16)  # up to 16 rows nothing is padded
    assert make_profile().step_seconds([(100, 0)], 0, 0) == p.prefill_seconds(100)


def test_transfer_seconds_and_kv_bytes():
    p = make_profile()
    assert p.transfer_seconds("grpc", 500_000_000) == pytest.approx(0.502)
    with pytest.raises(KeyError, match="no transfer cost for backend 'nccl'"):
        p.transfer_seconds("nccl", 1)
    assert p.kv_bytes_per_token == 4 * 2 * 2 * 8 * 2


def test_json_round_trip(tmp_path):
    p = make_profile()
    p.save(tmp_path / "p.json")
    assert CostProfile.load(tmp_path / "p.json") == p
    assert json.loads((tmp_path / "p.json").read_text())["kv_bytes_per_token"] == p.kv_bytes_per_token
    assert CostProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    padded = make_profile(row_padding=True)
    assert CostProfile.from_dict(padded.to_dict()) == padded
    older = p.to_dict()
    del older["row_padding"]  # profiles written before the field: no padding
    assert CostProfile.from_dict(older) == p


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format=99), "unsupported cost profile format"),
        (lambda d: d.update(source="guessed"), "source must be one of"),
        (lambda d: d["prefill"].update(tokens=[64, 16, 256]), "increasing"),
        (lambda d: d["decode"].update(seconds=[[0.1, 0.2]]), "2 rows of 2"),
        (lambda d: d["decode"]["seconds"][0].__setitem__(0, -1), "finite seconds >= 0"),
        (lambda d: d.update(kv_bytes_per_token=1), "does not match the KV layout"),
        (lambda d: d["kv"].update(dtype="int4"), "KV dtype must be one of"),
        (lambda d: d.pop("decode"), "malformed cost profile: KeyError"),
        (lambda d: d["transfer"]["grpc"].update(bytes_per_second=0), "bytes_per_second > 0"),
        (lambda d: d.update(row_padding="yes"), "row_padding must be true or false"),
    ],
)
def test_bad_profiles_are_refused(change, message):
    d = make_profile().to_dict()
    change(d)
    with pytest.raises(ValueError, match=message):
        CostProfile.from_dict(d)


def test_profile_path_takes_files_or_shipped_names(tmp_path):
    make_profile().save(tmp_path / "mine.json")
    assert profile_path(str(tmp_path / "mine.json")) == tmp_path / "mine.json"
    assert profile_path(None) == profile_path("") == PROFILES_DIR / f"{DEFAULT_PROFILE}.json"
    with pytest.raises(FileNotFoundError, match="shipped profiles"):
        profile_path("no-such-profile")


def test_shipped_profiles():
    names = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
    assert DEFAULT_PROFILE in names and len(names) >= 2
    for name in names:
        p = load_profile(name)
        assert p.name == name
        assert p.prefill_seconds(1024) > p.prefill_seconds(16) > 0 and p.decode_seconds(64, 64 * 512) > 0
        assert p.startup_seconds > 0 and {"nccl", "grpc"} <= set(p.transfer)
        if p.source == "derived":
            assert p.details["sources"] and p.details["formula"]
        else:
            assert {"cpu", "torch", "measured_at", "load_average_before"} <= set(p.details)


def test_imports_without_torch():
    code = "import sys, engine.cost_model; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

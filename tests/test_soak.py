"""A short `pdserve bench soak`: 30 seconds of mixed load (greedy, seeded, stop strings, client cancels)
on 2 prefill + 2 decode workers while a decode worker and then a prefill worker are SIGKILLed.
Nothing is lost: every request is served or cancelled by its client (with migration, kills cost no
failures), no KV block is held once the cluster is idle, the workers' invariants hold, and both
pools are back to full size."""

from benchmarks import soak


def test_short_soak_with_a_worker_killed_every_12s(ray_local, tmp_path, published_table):
    # seed 0: the first requests of clients 2 and 3 (EOS ignored) are among those cancelled mid-stream
    r = soak.main(["--duration", "30s", "--kill-every", "12s", "--concurrency", "6", "--cancel-rate", "0.2", "--seed", "0",
                   "--json", str(tmp_path / "soak.json"), "--plot", str(tmp_path / "soak.png")])  # fmt: skip
    q = r["requests"]
    assert q["failed"] == {}, q["errors"]
    assert q["served"] > 0 and q["cancelled"] > 0 and q["sent"] == q["served"] + q["cancelled"]
    killed = [k for k in r["kills"] if "worker" in k]
    assert [k["role"] for k in killed] == ["decode", "prefill"], r["kills"]
    moved = sum(r["moved"]["migrations_by_reason"].values()) + sum(r["moved"]["retries_by_reason"].values())
    assert moved >= 1 or not any(k["running"] for k in killed)
    assert r["blocks_leaked"] == 0 and r["invariant_violations"] == 0
    assert r["pools_at_end"] == {"prefill": 2, "decode": 2}
    assert r["rss_summary"]["router"]["peak"] > 0 and (tmp_path / "soak.png").read_bytes()[:4] == b"\x89PNG"
    table = published_table("soak", {"soak.json": tmp_path / "soak.json"})
    assert "cancelled by their client, **0 failed**" in table and "| KV blocks in use once idle | **0**; invariant violations 0 |" in table

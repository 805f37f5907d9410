"""The `pdserve bench` commands; each prints a table and can write JSON (and some a plot)."""

import json


def save_json(path: str | None, result: dict) -> None:
    """Write a benchmark's result to `path`, when one was given, stamped with the commit and machine it came from."""
    if path:
        from benchmarks.provenance import provenance

        with open(path, "w") as f:
            json.dump({**result, "provenance": provenance()}, f, indent=2)

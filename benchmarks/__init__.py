"""The `pdserve bench` commands; each prints a table and can write JSON (and some a plot)."""

import json


def save_json(path: str | None, result: dict) -> None:
    """Write a benchmark's result to `path`, when one was given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)

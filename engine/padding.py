"""The row counts a float32 CPU engine's packed linears run a step at (engine.model.PackedLinear).
Pure Python, so that the cost model prices a step at the rows the engine really computes."""

from __future__ import annotations


def padded_rows(rows: int) -> int:
    """The row count a packed linear runs `rows` at: exact up to 16 (small decode batches), above
    that rounded up to one of 8 sizes per doubling, so a step runs at most 1/8 more rows and a
    2,048-token step budget meets at most 72 sizes."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step

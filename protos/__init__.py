"""The .proto files of pdserve.v1 and their generated Python stubs.

The stubs are committed; `python -m protos.generate` regenerates them after a .proto changes,
and tests/test_protos.py fails if they are stale.
"""

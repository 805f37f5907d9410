"""The committed gRPC stubs are what the .proto files generate today."""

import filecmp

from protos.generate import PROTOS, REPO, generate


def test_committed_stubs_are_fresh(tmp_path):
    (tmp_path / "protos").mkdir()
    generate(tmp_path)
    for proto in PROTOS:
        stem = proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert filecmp.cmp(tmp_path / f"{stem}{suffix}", REPO / f"{stem}{suffix}", shallow=False), (
                f"{stem}{suffix} is stale: run `python -m protos.generate`"
            )

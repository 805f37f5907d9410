"""Regenerate the Python stubs from protos/*.proto: `python -m protos.generate [out_dir]`."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTOS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "protos").glob("*.proto"))


def generate(out_dir: Path = REPO) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{REPO}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)

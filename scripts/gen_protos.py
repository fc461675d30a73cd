"""Regenerate protos/*_pb2*.py from protos/microswarm.proto.

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: protos/). The generated gRPC module
imports its messages as `microswarm.protos.microswarm_pb2`, so it works from the installed package.
"""
from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", str(PROTO_DIR / "microswarm.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    grpc_file = out / "microswarm_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import microswarm_pb2 as", "from microswarm.protos import microswarm_pb2 as"))


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR)

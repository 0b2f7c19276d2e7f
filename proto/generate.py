"""Regenerate the Python gRPC code from gptswarm.proto:  python proto/generate.py

protoc names the generated modules after the .proto file's path below its include directory, so
it compiles gptswarm/proto/gptswarm.proto from the repository root (gptswarm/proto is this folder):
the generated modules then import each other as `gptswarm.proto.*`, the installed package name."""

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ("gptswarm_pb2.py", "gptswarm_pb2.pyi", "gptswarm_pb2_grpc.py")


def generate(out=ROOT):
    """Write the generated modules under out/gptswarm/proto/ (by default: this folder)."""
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", str(ROOT / "gptswarm" / "proto" / "gptswarm.proto")])
    if rc:
        sys.exit(f"protoc failed with status {rc}")


if __name__ == "__main__":
    generate()

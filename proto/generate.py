"""Regenerate the Python gRPC code from gptswarm.proto:  python proto/generate.py

The generated modules import each other as `gptswarm.proto.*`, the installed package name."""

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
OUTPUTS = ("gptswarm_pb2.py", "gptswarm_pb2.pyi", "gptswarm_pb2_grpc.py")


def generate(dest=HERE):
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "gptswarm" / "proto"
        pkg.mkdir(parents=True)
        shutil.copy(HERE / "gptswarm.proto", pkg)
        inc = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main(["protoc", f"-I{tmp}", f"-I{inc}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                          f"--grpc_python_out={tmp}", "gptswarm/proto/gptswarm.proto"])
        if rc:
            sys.exit(f"protoc failed with status {rc}")
        for name in OUTPUTS:
            shutil.copy(pkg / name, Path(dest) / name)


if __name__ == "__main__":
    generate()

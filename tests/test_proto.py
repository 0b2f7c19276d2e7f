"""The generated gRPC modules match gptswarm.proto (regenerate with: python proto/generate.py)."""

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the generator's own version, which it writes into the code: a newer grpcio-tools release is not a change of
# gptswarm.proto (the committed code's version is what it requires of grpcio and protobuf at import)
TOOL_VERSION = re.compile(r"(GRPC_GENERATED_VERSION = |Protobuf Python Version: )[^\n]*|"
                          r"(ValidateProtobufRuntimeVersion\()[^)]*")


def code(path):
    return TOOL_VERSION.sub(lambda m: (m.group(1) or m.group(2)) + "<version>", path.read_text())


def test_generated_code_is_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    for name in gen.OUTPUTS:
        assert code(tmp_path / "gptswarm" / "proto" / name) == code(REPO / "proto" / name), \
            f"proto/{name} is stale: run python proto/generate.py"


def test_installed_modules_import_under_the_package_name():
    from gptswarm.proto import PROTOCOL_VERSION, gptswarm_pb2, gptswarm_pb2_grpc

    assert PROTOCOL_VERSION >= 1
    assert "Coordinator" in gptswarm_pb2.DESCRIPTOR.services_by_name
    assert hasattr(gptswarm_pb2_grpc, "CoordinatorStub")

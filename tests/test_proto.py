"""The generated gRPC modules match gptswarm.proto (regenerate with: python proto/generate.py)."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_generated_code_is_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    for name in gen.OUTPUTS:
        assert (tmp_path / "gptswarm" / "proto" / name).read_text() == (REPO / "proto" / name).read_text(), \
            f"proto/{name} is stale: run python proto/generate.py"


def test_installed_modules_import_under_the_package_name():
    from gptswarm.proto import PROTOCOL_VERSION, gptswarm_pb2, gptswarm_pb2_grpc

    assert PROTOCOL_VERSION >= 1
    assert "Coordinator" in gptswarm_pb2.DESCRIPTOR.services_by_name
    assert hasattr(gptswarm_pb2_grpc, "CoordinatorStub")

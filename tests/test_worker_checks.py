"""A worker checks what a coordinator sends it: a hostile (or broken) coordinator, served here by a
real gRPC server, cannot make it build a model that does not fit, write files of its choosing, or
fill its memory or disk."""

import json
from concurrent import futures

import grpc
import pytest

from conftest import run_cli
from gptswarm.errors import UserError
from gptswarm.mingpt_core.model import GPTConfig
from gptswarm.mingpt_core.trainer import TrainConfig
from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc
from gptswarm.worker import download, run_config
from gptswarm.worker.client import CoordinatorClient

NANO = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
HUGE = GPTConfig(vocab_size=50257, block_size=2048, n_layer=512, n_head=128, n_embd=16384)  # 1.6e12 parameters


def run_config_of(model, **train):
    return pb.RunConfig(run_id="r", model_config_json=json.dumps(model.to_dict()),
                        train_config_json=json.dumps(TrainConfig(**train).to_dict()),
                        shards_json=json.dumps({"vocab_size": model.vocab_size, "layout": "stream"}), compression="fp16")


class Hostile(pb_grpc.CoordinatorServicer):
    """A coordinator that lets anyone join and then sends what the test sets."""

    def __init__(self, cfg, chunks=()):
        self.cfg, self.chunks = cfg, chunks

    def Join(self, request, context):
        return pb.JoinResponse(worker_id="w-1", session="s", worker_secret="x", protocol_version=PROTOCOL_VERSION)

    def GetRunConfig(self, request, context):
        return self.cfg

    def GetCheckpoint(self, request, context):
        yield from self.chunks


@pytest.fixture
def hostile():
    servers = []

    def start(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        client = CoordinatorClient(f"127.0.0.1:{port}", "t", plaintext=True)
        client.connect()
        return client

    yield start
    for s in servers:
        s.stop(0)


def test_run_configs_out_of_bounds_are_refused():
    import torch

    cpu = torch.device("cpu")
    spec = run_config.parse(run_config_of(NANO), cpu)
    assert spec.n_params > 0 and spec.model == NANO
    with pytest.raises(UserError, match=r"1,6\d\d,\d{3},\d{3},\d{3} parameters\) needs about .* GiB"):
        run_config.parse(run_config_of(HUGE), cpu)
    bad = run_config_of(NANO)
    for field, text in (("model_config_json", "[1, 2]"), ("train_config_json", "{"), ("model_config_json",
                        json.dumps({**NANO.to_dict(), "n_layer": 10**9})), ("model_config_json",
                        json.dumps({**NANO.to_dict(), "vocab_size": 1 << 20})), ("train_config_json",
                        json.dumps({"batch_size": -1})), ("train_config_json", json.dumps({"learning_rate": "nan"})),
                        ("model_config_json", json.dumps({**NANO.to_dict(), "surprise": 1}))):
        cfg = pb.RunConfig()
        cfg.CopyFrom(bad)
        setattr(cfg, field, text)
        with pytest.raises(UserError):
            run_config.parse(cfg, cpu)
    for changes, message in ((dict(compression="zstd"), "compression 'zstd'"),
                             (dict(compression="topk", topk_fraction=0.0), "top-k fraction 0"),
                             (dict(compression="topk", topk_fraction=float("nan")), "top-k fraction nan"),
                             (dict(shards_json=json.dumps({"vocab_size": 16, "layout": "stream", "piece_tokens": -5})),
                              "piece_tokens = -5")):
        cfg = pb.RunConfig()
        cfg.CopyFrom(bad)
        for k, v in changes.items():
            setattr(cfg, k, v)
        with pytest.raises(UserError, match=message):
            run_config.parse(cfg, cpu)


def test_checkpoint_files_are_the_formats_own_and_within_their_sizes(hostile):
    import torch

    spec = run_config.parse(run_config_of(NANO), torch.device("cpu"))
    limit = spec.file_limit("model.safetensors")
    cases = {
        "unexpected file": [pb.CheckpointChunk(file="../../.bashrc", data=b"x", size=1)],
        "declares": [pb.CheckpointChunk(file="model.safetensors", data=b"x", size=limit + 1)],
        "longer than declared": [pb.CheckpointChunk(file="config.json", data=b"x" * 10, size=5)],
        "incomplete": [pb.CheckpointChunk(file="config.json", data=b"x" * 4, size=5)],
        "unexpected file 'config.json'": [pb.CheckpointChunk(file="config.json", data=b"{}", size=2),
                                          pb.CheckpointChunk(file="tokenizer.json", data=b"{}", size=2),
                                          pb.CheckpointChunk(file="config.json", data=b"{}", size=2)],
    }
    for what, chunks in cases.items():
        client = hostile(Hostile(pb.RunConfig(), chunks))
        client.session = "s"
        with pytest.raises(UserError, match=what):
            download.theta(client, spec)


def test_a_worker_refuses_a_model_this_machine_cannot_hold(hostile, tmp_path):
    client = hostile(Hostile(run_config_of(HUGE)))
    r = run_cli("worker", "--join", client.address, "--plaintext", "--device", "cpu", "--state-dir", tmp_path / "w",
                timeout=120, env={"GPTSWARM_TOKEN": "t"})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cannot train here" in last and "parameters" in last, last

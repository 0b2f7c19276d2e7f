"""The operator's reducer nodes (`gptswarm reducer`), as real processes: a coordinator, two reducer
nodes with credentials made by `gptswarm reducer-credential`, and two workers. Rounds reduce on the
nodes (each an equal fraction of every tensor) and commit with every worker's theta agreeing; a
node killed mid-run costs at most a round and is left out of the groups after it; nobody without a
reducer credential (the swarm token, a worker's session, a revoked credential) can be a reducer."""

import json
import os
import random
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc
from fuzz_api import random_peer_id
from swarm import Process, channel, coordinator, join_address, ledger, wait_until, worker


def credential(state_dir, name, *extra):
    r = subprocess.run([sys.executable, "-m", "gptswarm", "reducer-credential", "--state-dir", str(state_dir),
                        "--name", name, *extra], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def reducer_node(join, name, secret, tmp_path):
    return Process(["reducer", "--join", join, *join.worker_args(), "--name", name, "--listen", "127.0.0.1:0",
                    "--state-dir", tmp_path / name], env={"GPTSWARM_REDUCER_CREDENTIAL": secret})


def status(coord, path="/api/v1/status"):
    url = coord.wait_for(r"status page: (http://\S+)").group(1)
    with urllib.request.urlopen(url.rstrip("/") + path, timeout=10) as f:
        return json.loads(f.read()) if path.startswith("/api") else f.read().decode()


def done_rounds(sd, after=-1):
    return ledger(sd, "SELECT COUNT(*) FROM rounds WHERE state = 'done' AND contributors >= 2 AND round > ?",
                  (after,))[0][0]


def test_reducer_nodes_reduce_rounds_and_a_dead_one_costs_at_most_a_round(tmp_path):
    sd = tmp_path / "state"
    coord = coordinator(sd)
    procs = [coord]
    try:
        join = join_address(coord)
        nodes = {name: reducer_node(join, name, credential(sd, name), tmp_path) for name in ("r1", "r2")}
        procs += nodes.values()
        for n in nodes.values():
            n.wait_for(r"registered as hivemind peer", 60)
        a, b = worker(join, "alice"), worker(join, "bob")
        procs += [a, b]
        wait_until(lambda: done_rounds(sd) >= 3 and coord.count(r"on 2 reducer node\(s\)") >= 3, 240,
                   "3 rounds of both workers reduced on both nodes")
        for n in nodes.values():
            n.wait_for(r"reduced part [12] of 2 for 2 member\(s\): ok", 30)
        for w in (a, b):  # both workers' theta agreed with the coordinator's in rounds the nodes reduced
            assert w.count(r"round \d+ done: theta \w+\.\.\. agrees with the coordinator") >= 2, w.output()[-2000:]
        snap = status(coord)
        assert {r["name"]: r["state"] for r in snap["reducers"]} == {"r1": "live", "r2": "live"}
        assert all(r["rounds"] >= 2 for r in snap["reducers"]), snap["reducers"]  # (the third may be averaging)
        metrics = status(coord, "/metrics")
        assert 'gptswarm_reducer_nodes{state="live"} 2.0' in metrics
        assert 'gptswarm_reducer_rounds_total{reducer="r1"}' in metrics

        nodes["r2"].kill()  # mid-run, maybe mid-round
        killed = ledger(sd, "SELECT MAX(round) FROM rounds")[0][0]
        wait_until(lambda: done_rounds(sd, killed) >= 2, 240, "2 rounds after a reducer node died")
        failed = ledger(sd, "SELECT COUNT(*) FROM rounds WHERE state = 'failed' AND detail LIKE '%reducer node%'")[0][0]
        assert failed <= 1, f"{failed} rounds failed for a reducer node"
        assert ledger(sd, "SELECT COUNT(*) FROM events WHERE kind = 'reducer_failed' AND detail LIKE '%r1%'")[0][0] == 0
        assert coord.count(r"on 1 reducer node\(s\)") >= 1
        for w in (a, b):
            w.stop()
        nodes["r1"].stop()
        coord.stop()
    finally:
        for p in procs:
            p.kill()
    events = [k for (k,) in ledger(sd, "SELECT kind FROM events WHERE kind LIKE 'reducer%'")]
    assert events.count("reducer_registered") == 2 and events.count("reducer_credential") == 2


def test_nobody_without_a_reducer_credential_is_a_reducer(tmp_path):
    sd = tmp_path / "state"
    coord = coordinator(sd, token="sekrit")
    try:
        join = join_address(coord)
        good = credential(sd, "r1")
        stub = pb_grpc.CoordinatorStub(channel(join))
        peer = new_peer_id()

        def register(name, secret):
            return stub.RegisterReducer(pb.RegisterReducerRequest(protocol_version=PROTOCOL_VERSION, name=name,
                                                                  credential=secret, peer_id=peer,
                                                                  maddrs=["/ip4/127.0.0.1/tcp/1"]), timeout=10)

        for name, secret in (("r1", "sekrit"), ("r1", ""), ("r2", good), ("r1", good + "x")):  # the swarm token is none
            with pytest.raises(grpc.RpcError) as e:
                register(name, secret)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # a worker's session is not a reducer's, and a reducer's is not a worker's
        joined = stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token="sekrit", name="w",
                                          peer_id=new_peer_id()), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetReduction(pb.ReductionRequest(first=True), metadata=[("authorization", f"Bearer {joined.session}")],
                              timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        session = register("r1", good).session
        with pytest.raises(grpc.RpcError) as e:
            stub.GetRunConfig(pb.RunConfigRequest(), metadata=[("authorization", f"Bearer {session}")], timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        got = stub.GetReduction(pb.ReductionRequest(first=True, wait=0.2),
                                metadata=[("authorization", f"Bearer {session}")], timeout=10)
        assert not got.found  # registered, named in no round yet
        # the command itself: a clear one-line error and a non-zero exit
        r = subprocess.run([sys.executable, "-m", "gptswarm", "reducer", "--join", join, *join.worker_args(), "--name",
                            "r1", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "node")],
                           env={**os.environ, "GPTSWARM_REDUCER_CREDENTIAL": "sekrit"}, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode != 0 and "Error: the coordinator refused this reducer" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        credential(sd, "r1", "--revoke")
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as e:
            register("r1", good)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        coord.stop()
    finally:
        coord.kill()
    refused = dict(ledger(sd, "SELECT kind, SUM(n) FROM refusals GROUP BY kind"))
    assert refused.get("reducer_auth_failed", 0) >= 5


def new_peer_id():
    return random_peer_id(random.Random())

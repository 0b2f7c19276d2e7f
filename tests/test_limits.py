"""What one stranger may take from the coordinator is bounded: downloads never pin the gRPC pool,
joins are rate-limited per network and counted without a row each, a shard only comes under a
lease for it, reflection is off, the status page is bounded and paged and dials nothing."""

import json
import random
import re
import time
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fuzz_api import random_peer_id
from gptswarm.coordinator.limits import Busy, StreamGuard
from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc
from swarm import channel, coordinator, join_address, ledger, wait_until, worker

RNG = random.Random(3)


def join(stub, name, token="sekrit"):
    return stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token=token, name=name,
                                    peer_id=random_peer_id(RNG)), timeout=10)


def auth(session):
    return [("authorization", f"Bearer {session}")]


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_stranger_cannot_exhaust_the_coordinator(tmp_path):
    sd = tmp_path / "coord"
    # a model whose checkpoint (6 MB) does not fit in the transport's buffers: a download that is
    # not read holds its server thread
    coord = coordinator(sd, "--model", "gpt-micro", "--join-burst", "30", "--joins-per-minute", "6")
    procs = [coord]
    try:
        addr = join_address(coord)
        page = coord.wait_for(r"status page: (http://\S+)").group(1)
        procs.append(worker(addr, "honest"))
        wait_until(lambda: ledger(sd, "SELECT 1 FROM rounds WHERE state = 'done'"), 90, "a first round")
        with channel(addr) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            sessions = [join(stub, f"hog-{i}").session for i in range(20)]
            # 40 checkpoint downloads from one session, 38 more from the others, none ever read
            held = [stub.GetCheckpoint(pb.CheckpointRequest(), metadata=auth(sessions[0]), timeout=120)
                    for _ in range(40)]
            held += [stub.GetCheckpoint(pb.CheckpointRequest(), metadata=auth(s), timeout=120)
                     for s in sessions[1:] for _ in range(2)]
            time.sleep(2)
            # what the server holds (a client's view of "not done" also counts downloads the server
            # finished sending into the transport's buffers)
            metrics = get(page + "metrics")[1].decode()
            open_now = float(re.search(r"^gptswarm_downloads_open (\S+)$", metrics, re.M).group(1))
            assert open_now <= 16, open_now  # the server-wide cap (the next test holds downloads for good)
            refused = [s for s in held[:40] if s.done() and s.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert len(refused) >= 30  # two at a time per session (more only as earlier ones finish)
            # an honest newcomer still joins, and the honest worker's heartbeats still get through
            t0 = time.time()
            newcomer = join(stub, "newcomer")
            stub.Heartbeat(pb.HeartbeatRequest(state="waiting"), metadata=auth(newcomer.session), timeout=5)
            assert time.time() - t0 < 5
            last_seen = ledger(sd, "SELECT last_seen FROM workers WHERE name = 'honest'")[0][0]
            assert time.time() - last_seen < 5
            for s in held:
                s.cancel()
            # no shard without a lease for it
            for lease_id in ("", "l-nobody"):
                with pytest.raises(grpc.RpcError) as e:
                    next(iter(stub.GetShard(pb.ShardRequest(lease_id=lease_id), metadata=auth(sessions[1]),
                                            timeout=10)))
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # wrong tokens: counted per network, one row, no attacker text; then rate-limited
            codes = []
            for i in range(15):
                try:
                    stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token="guess", name=f"<b>evil{i}</b>",
                                             peer_id=random_peer_id(RNG)), timeout=10)
                except grpc.RpcError as e:
                    codes.append(e.code())
            assert codes[:8] == [grpc.StatusCode.UNAUTHENTICATED] * 8  # 30 - 22 joins so far
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
            assert ledger(sd, "SELECT worker_id, n FROM refusals WHERE kind = 'auth_failed'") == \
                [("ip:127.0.0.0/24", codes.count(grpc.StatusCode.UNAUTHENTICATED))]
            assert not ledger(sd, "SELECT 1 FROM events WHERE detail LIKE '%evil%'")
            assert len(ledger(sd, "SELECT 1 FROM events WHERE detail LIKE 'auth_failed%'")) == 1
            # reflection is off unless the operator asks for it
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=5))
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # the status page: no probe of anything, bounded pages, bad queries answered 400
        assert get(page + "api/v1/is_reachable?addr=127.0.0.1:22")[0] == 404
        status, body = get(page + "api/v1/workers?limit=2&offset=1")
        workers = json.loads(body)
        assert status == 200 and workers["total"] == 22 and len(workers["workers"]) == 2
        assert get(page + "api/v1/workers?limit=100000")[0] == 400
        assert get(page + "api/v1/rounds?before=abc")[0] == 400
        rounds = json.loads(get(page + "api/v1/rounds?limit=1")[1])["rounds"]
        assert len(rounds) == 1 and rounds[0]["state"] in ("done", "failed", "rejected")
        snap = json.loads(get(page + "api/v1/status")[1])
        assert snap["worker_counts"]["total"] == 22 and len(snap["workers"]) == 22
        time.sleep(1.2)  # the metrics are computed at most once a second
        metrics = get(page + "metrics")[1].decode()
        assert "gptswarm_joins_rate_limited_total" in metrics and "gptswarm_downloads_open" in metrics
        assert 'gptswarm_refused_claims_total{kind="auth_failed"}' in metrics
    finally:
        for p in procs:
            p.kill()


class Numbers(pb_grpc.CoordinatorServicer):
    """A gRPC service whose checkpoint download is endless, under a StreamGuard."""

    def __init__(self, guard):
        self.guard = guard

    def GetCheckpoint(self, request, context):
        try:
            return self.guard.stream("s", context, (pb.CheckpointChunk(data=b"x" * (1 << 20)) for _ in iter(int, 1)))
        except Busy as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))


def test_a_download_whose_client_stops_reading_is_cancelled():
    guard = StreamGuard(per_session=1, total=4, stall_seconds=1.0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CoordinatorServicer_to_server(Numbers(guard), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            stream = stub.GetCheckpoint(pb.CheckpointRequest(), timeout=60)
            for _, _ in zip(range(3), stream):  # reads a little, then stops
                pass
            with pytest.raises(grpc.RpcError) as e:  # one per session
                next(iter(stub.GetCheckpoint(pb.CheckpointRequest(), timeout=10)))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            wait_until(lambda: guard.count() == 0, 20, "the stalled download to be cancelled")
            assert guard.cancelled == 1
            again = stub.GetCheckpoint(pb.CheckpointRequest(), timeout=60)  # its slot is free again
            assert len(next(iter(again)).data) == 1 << 20
            again.cancel()
    finally:
        server.stop(0)
        guard.close()

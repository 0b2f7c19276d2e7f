"""Volunteers are strangers: only registered workers reach the average, and every claim is checked.
A real coordinator and real workers on loopback; the attackers are stock hivemind peers and raw
gRPC clients, built here as an attacker would build them from the public code."""

import json
import secrets
import time

import grpc
import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import Float16Compression, serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2

from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc
from gptswarm.rounds.hivemind_ext import RoundServicer
from gptswarm.rounds.p2p import P2PNode
from gptswarm.rounds.theta import load_theta, theta_hash, theta_views
from swarm import channel, coordinator, hostile_worker, join_address, ledger, wait_until, worker

PEER_LINE = r"hivemind peer (\S+) at (/ip4/127\.0\.0\.1/tcp/\d+/p2p/[^\s,]+)"


def rounds_done(sd):
    return ledger(sd, "SELECT round, theta_hash, val_loss, tokens FROM rounds WHERE state = 'done' ORDER BY round")


def refusals(sd, kind):
    return ledger(sd, "SELECT worker_id, n, last_detail FROM refusals WHERE kind = ?", (kind,))


class Session:
    """A raw gRPC client with the swarm token: it says whatever it likes."""

    def __init__(self, join, name, peer_id, token="sekrit"):
        self.channel = channel(join)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        joined = self.stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token=token, name=name,
                                               peer_id=peer_id))
        self.worker_id, self.auth = joined.worker_id, [("authorization", f"Bearer {joined.session}")]

    def __getattr__(self, rpc):
        return lambda request: getattr(self.stub, rpc)(request, metadata=self.auth, timeout=10)

    def close(self):
        self.channel.close()


async def send_parts(p2p, coordinator_peer, prefix, group_id, value):
    """What a hand-made client sends to the coordinator's averaging endpoint: parts full of `value`."""
    async def parts():
        for i in range(3):
            part = serialize_torch_tensor(torch.full((1000,), value), Float16Compression().compression_type)
            yield averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=group_id,
                                              tensor_part=part, weight=1e9)
    stub = RoundServicer.get_stub(p2p, coordinator_peer, namespace=prefix)
    try:
        return [m.code async for m in await stub.rpc_aggregate_part(parts())]
    except Exception as e:  # the stream may just be closed on it
        return [type(e).__name__]


def test_strangers_never_reach_the_average(tmp_path):
    sd = tmp_path / "state"
    coord = coordinator(sd)
    procs = [coord]
    try:
        join = join_address(coord)
        coord_peer, coord_maddr = coord.wait_for(PEER_LINE).groups()
        run_id = json.loads((sd / "run.json").read_text())["run_id"]  # public: the status page shows it
        prefix = f"gptswarm-{run_id}"
        procs += [worker(join, "alice"), worker(join, "bob")]
        wait_until(lambda: len(rounds_done(sd)) >= 1, 120, "a first round")

        # 1. a stock hivemind averager with the run's prefix, dialing the coordinator's address: the
        # coordinator runs no DHT and no matchmaking, so there is nobody to lead, join or follow
        dht = hivemind.DHT(initial_peers=[coord_maddr], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           ensure_bootstrap_success=False)
        averager = DecentralizedAverager([torch.full((10,), 6e4)], dht, prefix=prefix, start=True,
                                         target_group_size=2, min_matchmaking_time=1.0, request_timeout=0.5)
        try:
            group = averager.step(timeout=6)
        except Exception:  # "could not find a group"
            group = None
        finally:
            averager.shutdown()
            dht.shutdown()
        assert group is None

        # 2. a raw hivemind peer calls the coordinator's averaging endpoint with a made-up group id
        stranger = P2PNode()
        try:
            stranger.connect(coord_peer, [coord_maddr])
            codes = stranger.run(send_parts(stranger.p2p, PeerID.from_base58(coord_peer), prefix,
                                            secrets.token_bytes(32), 6e4))
            assert averaging_pb2.AVERAGED_PART not in codes

            # 3. an insider leaks the real group id: a session that leased and claimed tokens is a member
            # of the round's group (with its own registered peer id); the stranger sends with its id
            insider_node = P2PNode()
            insider = Session(join, "insider", str(insider_node.peer_id))
            group = insider_group(insider)
            codes = stranger.run(send_parts(stranger.p2p, PeerID.from_base58(coord_peer), prefix,
                                            group.group_id, 6e4))
            assert averaging_pb2.AVERAGED_PART not in codes
            n = len(rounds_done(sd))
            wait_until(lambda: len(rounds_done(sd)) >= n + 2, 90, "rounds to go on")
        finally:
            stranger.shutdown()
        for p in procs[1:]:
            p.stop()
    finally:
        for p in procs:
            p.kill()

    # both refusals are counted against strangers (no worker of the ledger): the first as an event
    # (one a minute per kind), the last in the count's detail
    ((who, n, last),) = refusals(sd, "averaging_refused")
    assert who == "" and n >= 2 and "is not a member of the round's averaging group" in last
    first = ledger(sd, "SELECT detail FROM events WHERE kind = 'refused'")[0][0]
    assert "sent a contribution for no round being averaged" in first
    # the insider never sent: excluded, credited nothing, its leases back in the queue
    (wid,) = ledger(sd, "SELECT id FROM workers WHERE name = 'insider'")[0]
    assert ledger(sd, "SELECT included, reason FROM contributions WHERE worker_id = ? AND included IS NOT NULL",
                  (wid,)) == [(0, "did not send its whole contribution in time")]
    assert ledger(sd, "SELECT tokens_contributed FROM workers WHERE id = ?", (wid,))[0][0] == 0
    # theta is what the honest workers made: finite, sane, and the hash the ledger recorded
    model, _, meta, _ = load_theta(sd / "checkpoints" / "latest")
    theta = theta_views(model)
    assert all(t.isfinite().all() and t.abs().max() < 100 for t in theta.values())
    assert dict(ledger(sd, "SELECT round, theta_hash FROM rounds"))[meta["round"]] == theta_hash(theta)
    assert ledger(sd, "SELECT val_loss FROM rounds WHERE val_loss IS NOT NULL ORDER BY round DESC LIMIT 1")[0][0] < 2.5  # evaluated after its commit


def insider_group(s, timeout=150):
    """Lease a shard, claim tokens on it, wait for the round to average: the group, as a member."""
    lease = s.LeaseShard(pb.LeaseRequest(round=s.Heartbeat(pb.HeartbeatRequest(state="joining")).round))
    deadline = time.time() + timeout
    while not lease.granted:
        assert time.time() < deadline, lease.reason
        time.sleep(0.3)
        lease = s.LeaseShard(pb.LeaseRequest(round=s.Heartbeat(pb.HeartbeatRequest(state="waiting")).round))
    while True:
        assert time.time() < deadline, "the round did not average"
        view = s.Heartbeat(pb.HeartbeatRequest(round=current_round(s), state="training", lease_ids=[lease.lease_id],
                                               lease_tokens=[pb.LeaseTokens(lease_id=lease.lease_id, tokens=100)]))
        if view.phase == "averaging":
            group = s.GetAveragingGroup(pb.AveragingGroupRequest(round=view.round))
            if group.state == "member":
                return group
        time.sleep(0.2)


def current_round(s):
    return s.Heartbeat(pb.HeartbeatRequest(state="training")).round


def lease_round(s):
    """The round in which s may lease (a newcomer waits for the round after the one under way)."""
    return wait_until(lambda: (lambda b: b.may_train and b.round + 1)(s.Heartbeat(pb.HeartbeatRequest(
        state="waiting"))), 60, "a round this session may train in") - 1


def test_lying_workers_move_nothing(tmp_path):
    sd = tmp_path / "state"
    coord = coordinator(sd)
    procs = [coord]
    try:
        join = join_address(coord)
        procs += [worker(join, "alice"), hostile_worker(join, "heavy", "heavy")]  # claims weight 1e9
        wait_until(lambda: len(rounds_done(sd)) >= 1, 120, "a first round")
        liar = Session(join, "liar", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
        # hoarding: at most two active leases (asked again if the round began averaging meanwhile: the
        # honest workers may bring it its tokens between our heartbeat and our requests; or if the epoch's
        # last shards are all leased, waiting for the round's reports)
        for _ in range(10):
            r = lease_round(liar)
            leases = [liar.LeaseShard(pb.LeaseRequest(round=r)) for _ in range(4)]
            if not all("averaging in progress" in l.reason or "no shards available" in l.reason for l in leases):
                break
            time.sleep(1.0)  # the round's commit makes the shards its reports wait for leasable again
        held = [l for l in leases if l.granted]
        assert len(held) <= 2 and any("at most 2 active lease(s)" in l.reason for l in leases), leases
        # round tokens far beyond its leases, on leases it does not hold, and for a future round
        for lid, tokens in [(held[0].lease_id, 2**53), ("l-somebody-elses", 10**6)]:
            liar.Heartbeat(pb.HeartbeatRequest(round=r, state="training",
                                               lease_tokens=[pb.LeaseTokens(lease_id=lid, tokens=tokens)]))
        liar.Heartbeat(pb.HeartbeatRequest(round=r + 50, state="training", lease_tokens=[
            pb.LeaseTokens(lease_id=held[0].lease_id, tokens=10**6)]))
        # numbers no real worker sends: refused outright
        for tokens in (2**63 - 1, 2**64 - 1):
            try:
                liar.Heartbeat(pb.HeartbeatRequest(round=r, state="training", lease_tokens=[
                    pb.LeaseTokens(lease_id=held[0].lease_id, tokens=tokens)]))
                raise AssertionError(f"accepted {tokens} tokens")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in e.details()
        # another's hivemind identity: the coordinator's own, or an honest worker's (leaked)
        alice_peer = ledger(sd, "SELECT peer_id FROM workers WHERE name = 'alice'")[0][0]
        for peer, code in ((liar.GetRunConfig(pb.RunConfigRequest()).coordinator_peer_id,
                            grpc.StatusCode.INVALID_ARGUMENT), (alice_peer, grpc.StatusCode.ALREADY_EXISTS)):
            try:
                liar.RegisterPeer(pb.RegisterPeerRequest(peer_id=peer))
                raise AssertionError(f"registered {peer}")
            except grpc.RpcError as e:
                assert e.code() == code, e
        # reports for shards it never trained
        for l in held:
            assert not liar.ReportShard(pb.ReportRequest(lease_id=l.lease_id, round=r, loss=0.1)).accepted
        n = len(rounds_done(sd))
        wait_until(lambda: len(rounds_done(sd)) >= n + 3, 120, "three more rounds")
        for p in procs[1:]:
            p.stop()
    finally:
        for p in procs:
            p.kill()

    workers = dict(ledger(sd, "SELECT name, id FROM workers"))
    liar_id, heavy_id = workers["liar"], workers["heavy"]
    # the budget, the leaderboard and the shards moved only by verified tokens
    (trained,) = ledger(sd, "SELECT value FROM meta WHERE key = 'tokens_trained'")[0]
    included = ledger(sd, "SELECT COALESCE(SUM(tokens), 0) FROM contributions WHERE included = 1")[0][0]
    assert int(trained) == included
    assert ledger(sd, "SELECT tokens_contributed FROM workers WHERE id = ?", (liar_id,))[0][0] == 0
    assert not ledger(sd, "SELECT 1 FROM shards WHERE done_by = ?", (liar_id,))
    assert not ledger(sd, "SELECT 1 FROM contributions WHERE worker_id = ? AND included = 1", (liar_id,))
    # the heavy worker's weight is what its leases cover, never its 1e9: in no round is it credited
    # more than the tokens of the shards it held during that round
    credited = ledger(sd, "SELECT round, tokens FROM contributions WHERE worker_id = ? AND included = 1", (heavy_id,))
    assert credited
    for r, tokens in credited:
        held = ledger(sd, "SELECT COALESCE(SUM(l.tokens), 0) FROM leases l JOIN rounds r ON r.round = ? "
                          "WHERE l.worker_id = ? AND l.granted_at <= r.ended_at AND "
                          "(l.closed_at IS NULL OR l.closed_at >= r.started_at)", (r, heavy_id))[0][0]
        assert 0 < tokens <= held, (r, tokens, held)
    assert all(t < 10**6 for _, _, _, t in rounds_done(sd))
    # every lie is named
    kinds = {k for (k,) in ledger(sd, "SELECT kind FROM refusals WHERE worker_id = ?", (liar_id,))}
    assert {"lease_cap", "tokens_clamped", "future_round", "invalid_request", "report_refused", "peer_id_taken"} <= kinds
    assert ledger(sd, "SELECT COUNT(*) FROM events WHERE kind = 'refused' AND worker_id = ?", (liar_id,))[0][0] >= 5
    # the heavy worker's lie is named too; the honest one was refused nothing
    heavy = ledger(sd, "SELECT kind, last_detail FROM refusals WHERE worker_id = ?", (heavy_id,))
    assert [k for k, _ in heavy] == ["weight_claimed"] and "claimed weight 1e+09" in heavy[0][1]
    assert not ledger(sd, "SELECT 1 FROM refusals WHERE worker_id = ?", (workers["alice"],))

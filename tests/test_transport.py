"""The control plane's transport: TLS by default with the coordinator's certificate pinned, the
token and sessions never on the wire in the clear nor on a command line, secrets in files only
their owner can read, and sessions that end (Leave, expiry, token rotation) while the worker's
secret brings it back as the same worker."""

import hashlib
import random
import socket
import ssl
import stat
import threading
import time

import grpc
import pytest

from conftest import run_cli
from fuzz_api import random_peer_id
from gptswarm import transport
from gptswarm.errors import UserError
from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc
from swarm import JOIN, Join, channel, coordinator, join_address, ledger, wait_until, worker

PEER = random_peer_id(random.Random(1))


class Recorder:
    """A TCP relay to `target` that keeps every byte the client sent: what an eavesdropper sees."""

    def __init__(self, target):
        self.target = target
        self.sent = bytearray()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.sock.accept()
            upstream = socket.create_connection(transport.split_address(self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, record):
        try:
            while data := src.recv(65536):
                if record:
                    self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def join_through(address, pin, token="sekrit", **extra):
    """Join through a channel to address (the coordinator or a relay to it)."""
    join = Join(address)
    join.pin = pin
    with channel(join) as ch:
        return pb_grpc.CoordinatorStub(ch).Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token=token,
                                                               name="eve", peer_id=PEER, **extra), timeout=10)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_tls_by_default_pinned_and_secrets_private(tmp_path):
    sd = tmp_path / "coord"
    coord = coordinator(sd)
    procs = [coord]
    try:
        join = join_address(coord)
        line = coord.wait_for(JOIN.pattern).group(0)
        assert "--token" not in coord.output() and line.startswith("GPTSWARM_TOKEN=sekrit gptswarm worker")
        # the printed fingerprint is the certificate's, and the coordinator presents that certificate
        der = ssl.PEM_cert_to_DER_cert((sd / "tls-cert.pem").read_text())
        assert join.pin == "sha256:" + hashlib.sha256(der).hexdigest()
        assert transport.fingerprint(transport.presented_certificate(join)) == join.pin
        # secrets: only the owner can read them, the state directory included
        assert mode(sd) == 0o700
        for name in ("token", "tls-key.pem", "p2p_identity.key"):
            assert mode(sd / name) == 0o600, name
        # an eavesdropper between a worker and the coordinator sees neither the token nor the session
        relay = Recorder(join)
        joined = join_through(relay.address, join.pin)
        assert joined.session and len(relay.sent) > 500
        assert b"sekrit" not in relay.sent and joined.session.encode() not in relay.sent
        # an impostor (any other certificate) is refused before a byte of the token leaves
        wrong = "sha256:" + "0" * 64
        with pytest.raises(UserError, match="not the pinned"):
            transport.channel(join, pin=wrong)
        w = worker(join, "dupe", "--tls-fingerprint", wrong)
        assert w.p.wait(60) != 0 and "refusing to talk to it" in w.output() and "Traceback" not in w.output()
        # a client without TLS gets nothing from the TLS port
        with grpc.insecure_channel(join) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.CoordinatorStub(ch).Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # a real worker joins over it and keeps its session private
        wd = tmp_path / "w"
        procs.append(worker(join, "honest", "--state-dir", wd))
        wait_until(lambda: (wd / "session.json").exists(), 60, "the worker's session")
        assert mode(wd) == 0o700 and mode(wd / "session.json") == 0o600
    finally:
        for p in procs:
            p.kill()


def test_plaintext_only_on_loopback_and_visibly_so(tmp_path):
    r = run_cli("coordinator", "--task", "addition", "--state-dir", tmp_path / "a", "--listen", "0.0.0.0:0",
                "--p2p-listen", "127.0.0.1:0", "--plaintext", timeout=60)
    assert r.returncode != 0 and "--plaintext is only for a loopback --listen" in r.stderr.strip().splitlines()[-1]
    r = run_cli("worker", "--join", "192.0.2.1:7733", "--plaintext", "--device", "cpu", "--state-dir", tmp_path / "w",
                timeout=60)
    assert r.returncode != 0 and "only for a coordinator on this machine" in r.stderr.strip().splitlines()[-1]
    # the same eavesdropper, on a plaintext coordinator, reads the token: what TLS takes away
    coord = coordinator(tmp_path / "plain", "--plaintext")
    try:
        join = join_address(coord)
        assert join.pin == ""
        relay = Recorder(join)
        join_through(relay.address, "")
        assert b"sekrit" in relay.sent
    finally:
        coord.kill()


def test_sessions_end_and_the_secret_brings_the_worker_back(tmp_path):
    sd = tmp_path / "coord"
    coord = coordinator(sd, "--session-ttl", "3")
    procs = [coord]
    try:
        join = join_address(coord)
        with channel(join) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            first = stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token="sekrit", name="eve",
                                             peer_id=PEER), timeout=10)
            auth = [("authorization", f"Bearer {first.session}")]
            stub.GetRunConfig(pb.RunConfigRequest(), metadata=auth, timeout=10)
            stub.Leave(pb.LeaveRequest(), metadata=auth, timeout=10)
            with pytest.raises(grpc.RpcError) as e:  # Leave ended the session: no coming back with it
                stub.GetRunConfig(pb.RunConfigRequest(), metadata=auth, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # another join naming this worker without its secret becomes a new worker
            other = stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token="sekrit", name="mallory",
                                             peer_id=random_peer_id(random.Random(2)), worker_id=first.worker_id,
                                             worker_secret="guess"), timeout=10)
            assert other.worker_id != first.worker_id and other.worker_secret
            back = stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token="sekrit", name="eve",
                                            peer_id=PEER, worker_id=first.worker_id,
                                            worker_secret=first.worker_secret), timeout=10)
            assert back.worker_id == first.worker_id and not back.worker_secret and back.session != first.session
        # a real worker: Ctrl+C (Leave), a restart comes back as the same worker; so does one whose
        # session expired while it was away
        wd = tmp_path / "w"
        w = worker(join, "honest", "--state-dir", wd)
        w.wait_for(r"round \d+ done", 90)
        w.stop()
        again = worker(join, "honest", "--state-dir", wd)
        procs.append(again)
        again.wait_for(r"round \d+ done", 90)
        again.kill()  # no Leave: its session expires after 3 s of silence
        time.sleep(4)
        third = worker(join, "honest", "--state-dir", wd)
        procs.append(third)
        third.wait_for(r"round \d+ done", 90)
        assert ledger(sd, "SELECT COUNT(*) FROM workers WHERE name = 'honest'") == [(1,)]
        (wid,), = ledger(sd, "SELECT id FROM workers WHERE name = 'honest'")
        assert ledger(sd, "SELECT 1 FROM events WHERE kind = 'session_expired' AND worker_id = ?", (wid,))
        assert len(ledger(sd, "SELECT 1 FROM events WHERE kind = 'rejoin' AND worker_id = ?", (wid,))) >= 2
        # the operator rotates the token: every session ends, the old token opens nothing, and a
        # worker given the new one comes back as itself
        third.kill()
        coord.stop()
        coord = coordinator(sd, "--rotate-token", token=None, listen=join)  # the same address: workers know it
        procs.append(coord)
        join = join_address(coord)
        new_token = (sd / "token").read_text()
        assert new_token != "sekrit" and coord.wait_for(JOIN.pattern).group(1) == new_token
        stale = worker(join, "honest", "--state-dir", wd)
        assert stale.p.wait(90) != 0 and "wrong or missing swarm token" in stale.output()
        fresh = worker(join, "honest", "--state-dir", wd, token=new_token)
        procs.append(fresh)
        fresh.wait_for(r"round \d+ done", 90)
        assert ledger(sd, "SELECT COUNT(*) FROM workers WHERE name = 'honest'") == [(1,)]
        assert ledger(sd, "SELECT 1 FROM events WHERE kind = 'sessions_revoked'")
    finally:
        for p in procs:
            p.kill()

"""A fuzzer for the coordinator's gRPC API. It walks every RPC of the service from its descriptors
and fills every field with extreme values (empty, huge and unicode strings; extreme integers and
floats, NaN; long repeated fields; bytes), mixed with real ones (the current round, lease ids the
coordinator handed out), as nobody, as a stranger with a made-up session, and as a worker with a
real one. After every batch: the health service must answer, the ledger must pass an integrity
check, and no call may have ended UNKNOWN or INTERNAL (a crash in a handler).

The test suite runs it briefly (tests/test_fuzz.py); a long run starts its own swarm:

    python tests/fuzz_api.py --calls 100000
"""

import argparse
import json
import math
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
HUGE = 200_000
STRINGS = ["", "a", "x" * HUGE, "é🙂\u202e\u0000\ud7ff", "' OR 1=1; DROP TABLE workers; --", "../../../etc/passwd",
           "<script>alert(1)</script>", "training", "Qm" + "1" * 44, "12D3KooW" + "z" * 44, "\n" * 1000]
# what may go in a header (gRPC's client refuses anything else before sending it)
HEADER_STRINGS = ["", "a", "x" * 20_000, "' OR 1=1; --", "made-up-session", "Bearer", "../../etc/passwd", "%00%ff"]
UINTS = [0, 1, 2, 1000, 2**31 - 1, 2**32 - 1, 2**53, 2**53 + 1, 2**63 - 1, 2**64 - 1]
INTS = [0, 1, -1, -(2**63), 2**63 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, 1e12, 1e13]
BYTES = [b"", b"\x00" * 32, bytes(range(256)) * 400]
BAD_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
# the coordinator under fuzzing: a budget it never reaches, and no join rate limit (every call comes from loopback)
FUZZ_ARGS = ("--max-tokens", str(10**12), "--join-burst", "1000000")


def random_peer_id(rng):
    """A well-formed hivemind peer id nobody holds: a sha2-256 multihash of random bytes."""
    from hivemind.p2p import PeerID

    return PeerID(bytes([0x12, 0x20]) + rng.randbytes(32)).to_base58()


class Fuzzer:
    """channel: to the coordinator; token: the swarm token (to get real sessions); ledger_path: the
    coordinator's ledger.sqlite, read-only, for the integrity checks."""

    def __init__(self, channel, token, ledger_path, seed=0):
        self.stub = pb_grpc.CoordinatorStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.ledger_path = ledger_path
        self.rng = random.Random(seed)
        self.codes = Counter()
        self.failures = []  # (method, status, details) of UNKNOWN / INTERNAL answers
        self.calls = 0
        self.token = token
        self.session = self._session()
        self.lease_ids, self.round = [], 0

    def _session(self):
        """A real session of a new worker (or the one we had, if the coordinator will not give one now)."""
        try:
            joined = self.stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token=self.token,
                                                   name="fuzzer", peer_id=random_peer_id(self.rng)), timeout=10)
            return joined.session
        except grpc.RpcError:
            return getattr(self, "session", "")

    # --- values ---

    def value(self, field):
        r = self.rng
        t = field.type
        if t == F.TYPE_STRING:
            if field.name in ("lease_id",) and self.lease_ids and r.random() < 0.5:
                return r.choice(self.lease_ids)
            if field.name == "token" and r.random() < 0.3:
                return self.token
            return r.choice(STRINGS)
        if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return self.round if field.name == "round" and r.random() < 0.4 else r.choice(UINTS)
        if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return r.choice([u for u in UINTS if u < 2**32] + ([PROTOCOL_VERSION] * 3 if "version" in field.name else []))
        if t in (F.TYPE_INT64, F.TYPE_INT32, F.TYPE_SINT64, F.TYPE_SINT32, F.TYPE_SFIXED64, F.TYPE_SFIXED32):
            return r.choice([i for i in INTS if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64) or abs(i) < 2**31])
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return r.choice(FLOATS)
        if t == F.TYPE_BOOL:
            return r.random() < 0.5
        if t == F.TYPE_BYTES:
            return r.choice(BYTES)
        raise TypeError(t)

    def fill(self, message):
        r = self.rng
        for field in message.DESCRIPTOR.fields:
            if r.random() < 0.2:
                continue  # left at its default
            if field.type == F.TYPE_MESSAGE:
                n = r.choice([0, 1, 3, 1000] if field.is_repeated else [1])
                for _ in range(n):
                    self.fill(getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name))
            elif field.is_repeated:
                n = r.choice([0, 1, 10, 300, 10_000])
                values = [self.value(field) for _ in range(min(n, 20))]
                if any(isinstance(v, (str, bytes)) and len(v) > 1000 for v in values):
                    n = min(n, 8)  # over the coordinator's 1 MiB request limit already
                getattr(message, field.name).extend((values * (n // max(len(values), 1) + 1))[:n] if values else [])
            else:
                setattr(message, field.name, self.value(field))
        return message

    # --- calls ---

    def metadata(self):
        r = self.rng.random()
        if r < 0.15:
            return []
        if r < 0.3:
            return [("authorization", "Bearer " + self.rng.choice(HEADER_STRINGS))]
        if r < 0.35:
            return [("authorization", self.rng.choice(HEADER_STRINGS))]
        return [("authorization", f"Bearer {self.session}")]

    def call(self, method):
        request = self.fill(getattr(pb, method.input_type.name)())
        if method.client_streaming:  # a stream of fuzzed messages (UploadReplay): none, one or several
            request = iter([request] + [self.fill(getattr(pb, method.input_type.name)())
                                        for _ in range(self.rng.choice([0, 0, 1, 5]))][:self.rng.choice([0, 1, 6])])
        fn = getattr(self.stub, method.name)
        self.calls += 1
        try:
            if method.server_streaming:
                stream = fn(request, metadata=self.metadata(), timeout=10)
                for i, _ in enumerate(stream):
                    if i >= 2:
                        stream.cancel()
                        break
                code = grpc.StatusCode.OK
            else:
                metadata = self.metadata()
                response = fn(request, metadata=metadata, timeout=10)
                self._learn(method.name, response)
                if method.name == "Leave" and metadata == [("authorization", f"Bearer {self.session}")]:
                    self.session = self._session()  # it left: a new worker goes on
                code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.UNAUTHENTICATED and "session" in (e.details() or "") and self.rng.random() < 0.5:
                self.session = self._session()  # ours expired or was revoked (Leave): mostly a new one
            if code in BAD_CODES:
                self.failures.append((method.name, code.name, (e.details() or "")[:300]))
        self.codes[code.name] += 1

    def _learn(self, method, response):
        if method == "LeaseShard" and response.granted:
            self.lease_ids = (self.lease_ids + [response.lease_id])[-20:]
        if method == "Heartbeat":
            self.round = response.round

    def batch(self, n):
        methods = list(SERVICE.methods)
        for _ in range(n):
            self.call(self.rng.choice(methods))
        return self.check()

    # --- checks ---

    def check(self):
        """Problems found after a batch: [] when the coordinator is healthy and its ledger sound."""
        problems = []
        try:
            status = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=10).status
            if status != health_pb2.HealthCheckResponse.SERVING:
                problems.append(f"health: {status}")
        except grpc.RpcError as e:
            problems.append(f"health check failed: {e.code().name} {e.details()}")
        problems += ledger_problems(self.ledger_path)
        return problems


def ledger_problems(path):
    """The ledger's integrity: SQLite's own check, and the invariants between its tables."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        q = lambda sql: db.execute(sql).fetchall()  # noqa: E731
        problems = []
        if q("PRAGMA integrity_check") != [("ok",)]:
            problems.append("sqlite integrity_check failed")
        checks = {
            "a leased shard without exactly one open lease":
                "SELECT idx FROM shards s WHERE state = 'leased' AND (SELECT COUNT(*) FROM leases l WHERE "
                "l.shard_idx = s.idx AND l.epoch = s.epoch AND l.state IN ('active', 'trained')) != 1",
            "an open lease on a shard that is not leased":
                "SELECT l.id FROM leases l JOIN shards s ON s.idx = l.shard_idx WHERE l.state IN ('active', 'trained') "
                "AND s.state != 'leased'",
            "a lease credited beyond its tokens or below zero":
                "SELECT id FROM leases WHERE credited > tokens OR credited < 0 OR claimed < 0 OR claimed > tokens",
            "a contribution outside [0, 2^53]": "SELECT round FROM contributions WHERE tokens < 0 OR tokens > 9007199254740992",
            "a worker's total below zero": "SELECT id FROM workers WHERE tokens_contributed < 0 OR bytes_sent < 0",
            "a round of a state that does not exist":
                "SELECT round FROM rounds WHERE state NOT IN ('training', 'averaging', 'done', 'failed', 'rejected')",
            "a committed round with negative tokens": "SELECT round FROM rounds WHERE tokens < 0",
            "more than one round in training or averaging":
                "SELECT COUNT(*) FROM rounds WHERE state IN ('training', 'averaging') HAVING COUNT(*) > 1",
            "a done shard with an open lease":
                "SELECT s.idx FROM shards s JOIN leases l ON l.shard_idx = s.idx AND l.epoch = s.epoch "
                "WHERE s.state = 'done' AND l.state IN ('active', 'trained')",
        }
        for what, sql in checks.items():
            rows = q(sql)
            if rows:
                problems.append(f"{what}: {rows[:5]}")
        return problems
    finally:
        db.close()


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from swarm import channel, coordinator, join_address, ledger, worker

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dir", help="the coordinator's (default: a new temporary directory)")
    args = p.parse_args()
    sd = Path(args.state_dir or tempfile.mkdtemp(prefix="gptswarm-fuzz-")).resolve()
    coord = coordinator(sd, *FUZZ_ARGS)
    procs = [coord]
    t0 = time.time()
    try:
        join = join_address(coord)
        procs.append(worker(join, "honest"))
        fuzzer = Fuzzer(channel(join), "sekrit", sd / "ledger.sqlite", seed=args.seed)
        problems, rounds = [], []
        while fuzzer.calls < args.calls and not problems:
            problems = fuzzer.batch(min(args.batch, args.calls - fuzzer.calls))
            rounds.append(len(ledger(sd, "SELECT 1 FROM rounds WHERE state = 'done'")))
            print(f"{fuzzer.calls} calls, {dict(fuzzer.codes)}, {rounds[-1]} rounds done", flush=True)
        alive = coord.p.poll() is None
    finally:
        for proc in procs:
            proc.kill()
    print(json.dumps({"calls": fuzzer.calls, "seconds": round(time.time() - t0), "codes": dict(fuzzer.codes),
                      "unknown_or_internal": fuzzer.failures[:20], "problems": problems, "coordinator_alive": alive,
                      "rounds_done": rounds[-1], "rounds_done_while_fuzzing": rounds[-1] - rounds[0]}, indent=1))
    sys.exit(1 if fuzzer.failures or problems or not alive or not math.isfinite(rounds[-1]) else 0)


if __name__ == "__main__":
    main()

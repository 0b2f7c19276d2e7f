"""The worker's side of the coordinator's gRPC service: the channel (TLS with the coordinator's
certificate pinned, gptswarm/transport.py), authentication, coming back as the same worker when
a session expires or is revoked, and retries with exponential backoff while the coordinator is
unreachable."""

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message

from gptswarm import __version__
from gptswarm.errors import UserError
from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc
from gptswarm.transport import channel

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED)  # the coordinator said no: one line
MAX_BACKOFF = 30.0
MAX_MESSAGE = 4 << 20  # the largest message the coordinator sends is a 1 MiB chunk
UPLOAD_CHUNK = 1 << 19  # bytes per ReplayChunk (the coordinator takes messages of at most 1 MiB)


class Stopped(Exception):
    """The worker was asked to stop while waiting for the coordinator."""


class Guarded:
    """A str attribute of a CoordinatorClient read and written under its `_lock` (kept in `_<name>`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = "_" + name

    def __get__(self, obj: "CoordinatorClient", objtype: type | None = None) -> str:
        with obj._lock:
            return getattr(obj, self.field)

    def __set__(self, obj: "CoordinatorClient", value: str) -> None:
        with obj._lock:
            setattr(obj, self.field, value)


class CoordinatorClient:
    """address: the coordinator's HOST:PORT; token: the swarm token; pin: its certificate's
    fingerprint ("" to trust this machine's CA roots); plaintext: no TLS (loopback only); on_wait:
    fn(reason) while it waits for the coordinator. After join(): worker_id, session and secret;
    on_session() is called whenever they change.

    Every thread of the worker calls it: worker_id, session and secret change together under `_lock`
    (read them through their properties), a rejoin runs once under `joining`; identity, on_session
    and the channel are set (join_or_resume, connect) before the other threads start, and the
    channel closes (close) after they stop."""

    worker_id, session, secret = Guarded(), Guarded(), Guarded()

    def __init__(self, address: str, token: str, *, pin: str = "", plaintext: bool = False,
                 on_wait: Callable[[str], None] | None = None,
                 on_rpc: Callable[[str, float], None] | None = None) -> None:
        self.address, self.token, self.pin, self.plaintext = address, token, pin, plaintext
        self.on_rpc = on_rpc  # hears (method, seconds) after every call, retries included (benchmarks time RPCs)
        self._lock = threading.Lock()
        self._worker_id = self._session = self._secret = ""
        self.identity: tuple[str, str, str] | None = None  # (name, device, hivemind peer id) sent with every Join
        self.on_wait = on_wait or (lambda reason: None)
        self.on_session: Callable[[], None] = lambda: None
        self.stop = threading.Event()
        self.joining = threading.Lock()
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.CoordinatorStub | None = None

    def restore(self, worker_id: str, secret: str, session: str) -> None:
        """Come back as a saved worker (session.py)."""
        with self._lock:
            self._worker_id, self._secret, self._session = worker_id, secret, session

    def _backoff(self, delay: float, reason: str) -> float:
        self.on_wait(f"{reason} (retry in {delay:.0f} s)")
        if self.stop.wait(delay):
            raise Stopped() from None
        return min(delay * 2, MAX_BACKOFF)

    def connect(self) -> None:
        """Open the channel, waiting (with backoff) while the coordinator does not answer; UserError
        if it answers with a certificate that is not the pinned one."""
        delay = 1.0
        while True:
            try:
                self.channel = channel(self.address, pin=self.pin, plaintext=self.plaintext,
                                       options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
                self.stub = pb_grpc.CoordinatorStub(self.channel)
                return
            except ConnectionError:
                delay = self._backoff(delay, "coordinator unreachable")

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = self.stub = None

    def call(self, method: str, request: Message, timeout: float = 15.0, retry: bool = True) -> Any:
        """Call an RPC; retry with backoff (1, 2, 4 ... 30 s) while the coordinator is unreachable
        or busy; join again once if the session expired or was revoked. A stream is returned as
        its iterator (the caller reads it)."""
        if self.on_rpc is None:
            return self._call(method, request, timeout, retry)
        t0 = time.perf_counter()
        try:
            return self._call(method, request, timeout, retry)
        finally:
            self.on_rpc(method, time.perf_counter() - t0)

    def _call(self, method: str, request: Message, timeout: float, retry: bool) -> Any:
        delay, rejoined = 1.0, False
        while True:
            session = self.session
            try:
                fn = getattr(self.stub, method)
                metadata = [("authorization", f"Bearer {session}")] if session else []
                return fn(request, metadata=metadata, timeout=timeout)
            except grpc.RpcError as e:
                code = e.code()
                if code in RETRYABLE and retry and not self.stop.is_set():
                    delay = self._backoff(delay, "coordinator unreachable" if code != grpc.StatusCode.RESOURCE_EXHAUSTED
                                          else "coordinator busy")
                    continue
                if method != "Join" and not rejoined and self.rejoin_if_ended(e, session):
                    rejoined = True
                    continue
                if code in REFUSED:
                    raise UserError(f"the coordinator at {self.address} refused: {e.details()}") from None
                raise

    def rejoin_if_ended(self, error: BaseException, session: str) -> bool:
        """If `error` (from a call made with `session`, a stream's included) says that our session
        ended (expired, revoked), join again as the same worker, once for all the threads that find
        out, and return True: the call must be made again, never retried with the ended session."""
        code = getattr(error, "code", None)
        if not (isinstance(error, grpc.RpcError) and callable(code) and code() == grpc.StatusCode.UNAUTHENTICATED
                and self.worker_id and self.identity is not None):
            return False
        with self.joining:  # the heartbeat thread and the round loop may both find out
            if self.session == session and self.identity is not None:
                self.join(*self.identity)  # come back as the same worker
        return True

    def join(self, name: str, device: str, peer_id: str) -> pb.JoinResponse:
        """Join as a new worker, or (with a saved worker id and secret) as the same one again."""
        self.identity = (name, device, peer_id)
        self.session = ""
        worker_id, secret = self.worker_id, self.secret
        resp = self.call("Join", pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token=self.token, name=name,
                                                device=device, peer_id=peer_id, software_version=__version__,
                                                worker_id=worker_id, worker_secret=secret))
        with self._lock:
            if resp.worker_secret:  # a new worker
                self._secret = resp.worker_secret
            self._worker_id, self._session = resp.worker_id, resp.session
        self.on_session()
        return resp

    # --- the RPCs a worker makes, one typed method each ---

    def run_config(self) -> pb.RunConfig:
        return self.call("GetRunConfig", pb.RunConfigRequest())

    def register_peer(self, peer_id: str) -> pb.RegisterPeerResponse:
        """Tell the coordinator our hivemind peer id (a resumed session's peer is a new one)."""
        return self.call("RegisterPeer", pb.RegisterPeerRequest(peer_id=peer_id))

    def lease(self, *, round_: int, finished_lease_ids: Iterable[str], claims: Mapping[str, int]) -> pb.LeaseResponse:
        """Ask for a shard to train in round_, saying which leases we finished and what we claim."""
        return self.call("LeaseShard", pb.LeaseRequest(round=round_, finished_lease_ids=finished_lease_ids,
                                                       lease_tokens=lease_tokens(claims)))

    def shard(self, lease_id: str, *, timeout: float) -> Iterator[pb.DataChunk]:
        """A leased shard's bytes, as a stream (its errors arrive as it is read)."""
        return self.call("GetShard", pb.ShardRequest(lease_id=lease_id), timeout=timeout)

    def checkpoint(self, *, timeout: float) -> Iterator[pb.CheckpointChunk]:
        """The latest checkpoint's files, as a stream (its errors arrive as it is read)."""
        return self.call("GetCheckpoint", pb.CheckpointRequest(), timeout=timeout)

    def release(self, lease_ids: Iterable[str], *, timeout: float = 15.0, retry: bool = True) -> pb.ReleaseResponse:
        """Give leases back (their shards go back to the queue)."""
        return self.call("ReleaseLeases", pb.ReleaseRequest(lease_ids=lease_ids), timeout=timeout, retry=retry)

    def heartbeat(self, *, round_: int, state: str, reason: str, tokens_per_second: float, lease_ids: Iterable[str],
                  claims: Mapping[str, int], loss: float, bytes_sent: int) -> pb.HeartbeatResponse:
        """What we are doing, and the leases to extend; never waits for an unreachable coordinator
        (the next heartbeat tries again)."""
        return self.call("Heartbeat", pb.HeartbeatRequest(
            round=round_, tokens_per_second=tokens_per_second, state=state, reason=reason, lease_ids=lease_ids,
            bytes_sent=bytes_sent, loss=loss, lease_tokens=lease_tokens(claims)), timeout=5, retry=False)

    def averaging_group(self, round_: int, claims: Mapping[str, int], replay_commit: str = "") -> pb.AveragingGroup:
        """Our place in round_'s averaging group; claims: our final claims on its leases (our weight);
        replay_commit: the sha256 of our record of the round (rounds/replay.py)."""
        return self.call("GetAveragingGroup", pb.AveragingGroupRequest(round=round_, lease_tokens=lease_tokens(claims),
                                                                       replay_commit=replay_commit))

    def upload_replay(self, round_: int, blob: bytes, *, timeout: float = 600.0) -> pb.ReplayReceipt:
        """Our record of round_, which the coordinator asked for (one try: the stream is read once)."""
        chunks = (pb.ReplayChunk(round=round_, data=blob[i:i + UPLOAD_CHUNK])
                  for i in range(0, max(1, len(blob)), UPLOAD_CHUNK))
        return self.call("UploadReplay", chunks, timeout=timeout, retry=False)

    def round_result(self, round_: int) -> pb.RoundResult:
        return self.call("GetRoundResult", pb.RoundResultRequest(round=round_))

    def report(self, lease_id: str, *, round_: int, loss: float) -> pb.ReportResponse:
        """A shard finished in round_, whose average included its training."""
        return self.call("ReportShard", pb.ReportRequest(lease_id=lease_id, round=round_, loss=loss))

    def leave(self, *, timeout: float = 15.0, retry: bool = True) -> pb.LeaveResponse:
        return self.call("Leave", pb.LeaveRequest(), timeout=timeout, retry=retry)


def lease_tokens(claims: Mapping[str, int]) -> list[pb.LeaseTokens]:
    return [pb.LeaseTokens(lease_id=k, tokens=v) for k, v in claims.items()]

"""The worker's side of the coordinator's gRPC service: the channel (TLS with the coordinator's
certificate pinned, gptswarm/transport.py), authentication, coming back as the same worker when
a session expires or is revoked, and retries with exponential backoff while the coordinator is
unreachable."""

import threading

import grpc

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


class Stopped(Exception):
    """The worker was asked to stop while waiting for the coordinator."""


class CoordinatorClient:
    """address: the coordinator's HOST:PORT; token: the swarm token; pin: its certificate's
    fingerprint ("" to trust this machine's CA roots); plaintext: no TLS (loopback only).
    After join(): worker_id, session and secret; on_session() is called whenever they change."""

    def __init__(self, address, token, *, pin="", plaintext=False, on_wait=None):
        self.address, self.token, self.pin, self.plaintext = address, token, pin, plaintext
        self.worker_id = self.session = self.secret = ""
        self.identity = None  # (name, device, hivemind peer id) sent with every Join
        self.on_wait = on_wait or (lambda reason: None)
        self.on_session = lambda: None
        self.stop = threading.Event()
        self.joining = threading.Lock()
        self.channel = self.stub = None

    def _backoff(self, delay, reason):
        self.on_wait(f"{reason} (retry in {delay:.0f} s)")
        if self.stop.wait(delay):
            raise Stopped() from None
        return min(delay * 2, MAX_BACKOFF)

    def connect(self):
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

    def close(self):
        if self.channel is not None:
            self.channel.close()
            self.channel = self.stub = None

    def _metadata(self):
        return [("authorization", f"Bearer {self.session}")] if self.session else []

    def call(self, method, request, timeout=15.0, retry=True):
        """Call an RPC; retry with backoff (1, 2, 4 ... 30 s) while the coordinator is unreachable
        or busy; join again once if the session expired or was revoked. A stream is returned as
        its iterator (the caller reads it)."""
        delay, rejoined = 1.0, False
        while True:
            session = self.session
            try:
                fn = getattr(self.stub, method)
                return fn(request, metadata=self._metadata(), timeout=timeout)
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

    def rejoin_if_ended(self, error, session):
        """If `error` (from a call made with `session`, a stream's included) says that our session
        ended (expired, revoked), join again as the same worker, once for all the threads that find
        out, and return True: the call must be made again, never retried with the ended session."""
        code = getattr(error, "code", None)
        if not (isinstance(error, grpc.RpcError) and callable(code) and code() == grpc.StatusCode.UNAUTHENTICATED
                and self.worker_id and self.identity is not None):
            return False
        with self.joining:  # the heartbeat thread and the round loop may both find out
            if self.session == session:
                self.join(*self.identity)  # come back as the same worker
        return True

    def join(self, name, device, peer_id):
        """Join as a new worker, or (with a saved worker id and secret) as the same one again."""
        self.identity = (name, device, peer_id)
        self.session = ""
        resp = self.call("Join", pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token=self.token, name=name,
                                                device=device, peer_id=peer_id, software_version=__version__,
                                                worker_id=self.worker_id, worker_secret=self.secret))
        if resp.worker_secret:  # a new worker
            self.secret = resp.worker_secret
        self.worker_id, self.session = resp.worker_id, resp.session
        self.on_session()
        return resp

"""The worker's side of the coordinator's gRPC service: authentication and retries with
exponential backoff while the coordinator is unreachable."""

import threading

import grpc

from gptswarm import __version__
from gptswarm.errors import UserError
from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED)  # the coordinator said no: one line
MAX_BACKOFF = 30.0


class Stopped(Exception):
    """The worker was asked to stop while waiting for the coordinator."""


class CoordinatorClient:
    def __init__(self, address, token, on_wait=None):
        self.address, self.token = address, token
        self.session = ""
        self.on_wait = on_wait or (lambda reason: None)
        self.stop = threading.Event()
        self.channel = self.stub = None

    def connect(self):
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def close(self):
        if self.channel is not None:
            self.channel.close()
            self.channel = self.stub = None

    def _metadata(self):
        return [("authorization", f"Bearer {self.session}")] if self.session else []

    def call(self, method, request, timeout=15.0, retry=True, stream=False):
        """Call an RPC; retry with backoff (1, 2, 4 ... 30 s) while the coordinator is unreachable.
        A stream's messages are returned as a list."""
        delay = 1.0
        while True:
            try:
                fn = getattr(self.stub, method)
                if stream:
                    return list(fn(request, metadata=self._metadata(), timeout=timeout))
                return fn(request, metadata=self._metadata(), timeout=timeout)
            except grpc.RpcError as e:
                code = e.code()
                if code in RETRYABLE and retry and not self.stop.is_set():
                    self.on_wait(f"coordinator unreachable (retry in {delay:.0f} s)")
                    if self.stop.wait(delay):
                        raise Stopped() from None
                    delay = min(delay * 2, MAX_BACKOFF)
                    continue
                if code in REFUSED:
                    raise UserError(f"the coordinator at {self.address} refused: {e.details()}") from None
                raise

    def join(self, name, device, peer_id):
        resp = self.call("Join", pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token=self.token, name=name,
                                                device=device, peer_id=peer_id, software_version=__version__))
        self.session = resp.session
        return resp

"""The coordinator's gRPC service (proto/gptswarm.proto), plus grpc health (and reflection, only
when the operator asks for it), over TLS unless it listens on loopback in plaintext on purpose.

Every field of every request is a claim from a stranger: it is checked here for type and range
(a malformed request is answered INVALID_ARGUMENT and counted as a refusal), and what it claims
is then checked against the ledger (coordinator/ledger.py). What one stranger may take is bounded
(coordinator/limits.py): joins per network, concurrent RPCs, downloads per session and in all,
the size of a request and of its repeated fields.
"""

import hmac
import json
import logging
import math
import os
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gptswarm import __version__
from gptswarm.coordinator.limits import Busy, RateLimiter, StreamGuard, source_of
from gptswarm.errors import UserError
from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc
from gptswarm.rounds.reports import MAX_REPORT
from gptswarm.states import REPORTED_STATES

log = logging.getLogger("gptswarm.coordinator")
CHUNK = 1 << 20
MAX_REQUEST = 1 << 20  # bytes of one request (the largest honest one, a heartbeat of 256 leases, is ~20 KiB)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
MAX_COUNT = 1 << 53  # the largest count (tokens, bytes, rounds) a request may carry
MAX_IDS = 256  # lease ids in one request
MAX_ID_LEN = 64
MAX_PEER_ID_LEN = 128


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """Threads: gRPC's pool calls every RPC at once; the service keeps no state of its own beyond
    its limiters (each under its own lock) and asks the Coordinator for everything else."""

    def __init__(self, coord):
        self.coord = coord  # coordinator.server.Coordinator: what a worker may do is decided there
        cfg = coord.config
        self.joins = RateLimiter(burst=cfg.join_burst, per_second=cfg.joins_per_second)
        self.streams = StreamGuard(per_session=cfg.streams_per_session, total=cfg.streams_total,
                                   stall_seconds=cfg.stream_stall_seconds)

    # --- authentication and checks ---

    def _worker(self, context):
        md = dict(context.invocation_metadata())
        auth = md.get("authorization", "")
        session = auth[7:] if auth.startswith("Bearer ") else ""
        worker = self.coord.authenticate(session)
        if worker is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing, expired or revoked session: join (again) with the swarm token")
        return worker

    def _invalid(self, context, worker, what):
        """Refuse a malformed request: counted against the worker, answered INVALID_ARGUMENT."""
        self.coord.refuse("invalid_request", what, worker["id"] if worker else "")
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, what)

    def _count(self, context, worker, value, what):
        if value > MAX_COUNT:
            self._invalid(context, worker, f"{what} {value} is out of range")
        return value

    def _real(self, context, worker, value, what, high):
        if not (math.isfinite(value) and 0 <= value <= high):
            self._invalid(context, worker, f"{what} {value} is not a number between 0 and {high:g}")
        return value

    def _ids(self, context, worker, ids, what):
        if len(ids) > MAX_IDS or any(len(i) > MAX_ID_LEN for i in ids):
            self._invalid(context, worker, f"too many or too long {what} ({len(ids)})")
        return list(ids)

    def _lease_tokens(self, context, worker, entries):
        """{lease_id: tokens} from repeated LeaseTokens."""
        claims = {}
        self._ids(context, worker, [e.lease_id for e in entries], "lease claims")
        for e in entries:
            claims[e.lease_id] = max(claims.get(e.lease_id, 0), self._count(context, worker, e.tokens, "tokens"))
        return claims

    def _peer_id(self, context, worker, peer_id):
        from hivemind.p2p import PeerID

        try:
            if len(peer_id) > MAX_PEER_ID_LEN:
                raise ValueError
            peer_id = PeerID.from_base58(peer_id).to_base58()
        except Exception:
            self._invalid(context, worker, f"peer id {peer_id[:MAX_PEER_ID_LEN]!r} is not a hivemind peer id")
        if peer_id == str(self.coord.node.peer_id):
            self._invalid(context, worker, "that is the coordinator's own hivemind peer id")
        return peer_id

    # --- the RPCs ---

    def _arrival(self, request, context, who):
        """A Join's or a RegisterReducer's first checks: the protocol version, then the caller's network's
        rate; its source address."""
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this {who} speaks gptswarm protocol v{request.protocol_version} but the coordinator "
                          f"speaks v{PROTOCOL_VERSION} (gptswarm {__version__}): install the same gptswarm version")
        source = source_of(context.peer())
        allowed, wait = self.joins.allow(source)
        if not allowed:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many joins from your network: retry in {math.ceil(wait)} s")
        return source

    def Join(self, request, context):
        source = self._arrival(request, context, "worker")
        if not request.token or not hmac.compare_digest(request.token.encode(), self.coord.token.encode()):
            self.coord.refuse_source("auth_failed", "a join with a wrong or missing swarm token", source)
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "wrong or missing swarm token: set GPTSWARM_TOKEN (or --token-file) to the token the "
                          "operator gave you")
        peer_id = self._peer_id(context, None, request.peer_id)
        if len(request.worker_id) > MAX_ID_LEN or len(request.worker_secret) > MAX_ID_LEN:
            self._invalid(context, None, "worker id or secret too long")
        owner = self.coord.peer_owner(peer_id)
        if owner is not None and owner != request.worker_id:
            self.coord.refuse("peer_id_taken", f"a join tried to register peer id {peer_id}, which another worker holds")
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "that hivemind peer id is registered by another worker")
        cfg = self.coord.config
        if request.worker_id:
            session = self.coord.resume_worker(request.worker_id, request.worker_secret, peer_id)
            if session is not None:
                log.info("worker %s came back from %s", request.worker_id, source)
                return pb.JoinResponse(worker_id=request.worker_id, session=session, session_ttl=cfg.session_ttl,
                                       run_id=self.coord.settings.run_id, protocol_version=PROTOCOL_VERSION)
            if self.coord.known_worker(request.worker_id):
                self.coord.refuse_source("resume_refused", "a join as a known worker without its secret", source)
            if owner is not None:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, "that hivemind peer id is registered by another worker")
        name = (request.name or "anonymous").strip()[:64]
        worker_id, session, secret = self.coord.add_worker(name, request.device[:128], peer_id)
        log.info("worker %s (%s) joined from %s", worker_id, name, source)
        return pb.JoinResponse(worker_id=worker_id, session=session, worker_secret=secret, session_ttl=cfg.session_ttl,
                               run_id=self.coord.settings.run_id, protocol_version=PROTOCOL_VERSION)

    def RegisterPeer(self, request, context):
        w = self._worker(context)
        ok, detail = self.coord.register_peer(w["id"], self._peer_id(context, w, request.peer_id))
        if not ok:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, detail)
        return pb.RegisterPeerResponse()

    def GetRunConfig(self, request, context):
        self._worker(context)
        c = self.coord
        s = c.settings
        shards = {k: v for k, v in c.shard_set.manifest().items() if k != "shards"}
        return pb.RunConfig(
            run_id=s.run_id, model_config_json=json.dumps(s.model), train_config_json=json.dumps(s.train),
            tokenizer_json=c.tokenizer.to_str(), shards_json=json.dumps(shards),
            tokens_per_round=s.tokens_per_round, max_tokens=s.max_tokens, compression=s.compression,
            outer_lr=s.outer_lr, outer_momentum=s.outer_momentum, averaging_prefix=c.averaging_prefix,
            averaging_timeout=c.config.averaging_timeout, heartbeat_interval=c.config.heartbeat_interval,
            coordinator_peer_id=str(c.node.peer_id), coordinator_maddrs=c.node.maddrs(),
            sender_timeout=c.config.sender_timeout, topk_fraction=s.topk_fraction, max_leases=c.config.max_leases)

    def LeaseShard(self, request, context):
        w = self._worker(context)
        c = self.coord
        round_ = self._count(context, w, request.round, "round")
        finished = self._ids(context, w, request.finished_lease_ids, "finished lease ids")
        claims = self._lease_tokens(context, w, request.lease_tokens)
        lease = c.lease(w, round_, finished, claims)
        if isinstance(lease, str):
            return pb.LeaseResponse(granted=False, reason=lease, retry_after=c.config.heartbeat_interval)
        return pb.LeaseResponse(granted=True, **lease)

    def Heartbeat(self, request, context):
        w = self._worker(context)
        c = self.coord
        if request.state not in REPORTED_STATES:
            self._invalid(context, w, f"unknown worker state {request.state[:32]!r}")
        return pb.HeartbeatResponse(**c.heartbeat(
            w, round_=self._count(context, w, request.round, "round"),
            lease_tokens=self._lease_tokens(context, w, request.lease_tokens),
            tps=self._real(context, w, request.tokens_per_second, "tokens per second", 1e12),
            state=request.state, reason=request.reason[:200],
            lease_ids=self._ids(context, w, request.lease_ids, "lease ids"),
            bytes_sent=self._count(context, w, request.bytes_sent, "bytes sent"),
            loss=self._real(context, w, request.loss, "loss", 1e6) or None))

    def _stream(self, context, worker, chunks):
        """chunks, sent while this download holds one of the server's few stream slots."""
        try:
            return self.streams.stream(worker["id"], context, chunks)
        except Busy as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

    def GetShard(self, request, context):
        w = self._worker(context)
        raw = self.coord.shard_tokens(w, request.lease_id[:MAX_ID_LEN])
        if raw is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no active lease of yours with that id: lease a shard first")
        return self._stream(context, w, (pb.DataChunk(data=raw[i:i + CHUNK]) for i in range(0, len(raw), CHUNK)))

    def ReportShard(self, request, context):
        w = self._worker(context)
        if len(request.lease_id) > MAX_ID_LEN:
            self._invalid(context, w, "lease id too long")
        round_ = self._count(context, w, request.round, "round")
        loss = self._real(context, w, request.loss, "loss", 1e6)
        ok, detail = self.coord.report(w["id"], request.lease_id, round_, loss)
        return pb.ReportResponse(accepted=ok, detail=detail)

    def ReleaseLeases(self, request, context):
        w = self._worker(context)
        ids = set(self._ids(context, w, request.lease_ids, "lease ids"))
        return pb.ReleaseResponse(released=self.coord.release(w["id"], ids))

    def GetAveragingGroup(self, request, context):
        w = self._worker(context)
        commit = request.replay_commit
        if commit and not (len(commit) == 64 and all(c in "0123456789abcdef" for c in commit)):
            self._invalid(context, w, "replay_commit is not a sha256 in hex")
        return pb.AveragingGroup(**self.coord.averaging_group(self._count(context, w, request.round, "round"), w,
                                                              self._lease_tokens(context, w, request.lease_tokens),
                                                              commit))

    def UploadReplay(self, request_iterator, context):
        w = self._worker(context)

        def chunks():
            for chunk in request_iterator:
                self._count(context, w, chunk.round, "round")
                yield chunk
        accepted, detail = self.coord.upload_replay(w["id"], chunks())
        if not accepted:
            self.coord.refuse("replay_refused", detail, w["id"])
        return pb.ReplayReceipt(accepted=accepted, detail=detail)

    # --- the operator's reducer nodes (coordinator/reducers.py): a credential of their own ---

    def _reducer(self, context):
        md = dict(context.invocation_metadata())
        auth = md.get("authorization", "")
        name = self.coord.reducer_nodes.authenticate(auth[7:] if auth.startswith("Bearer ") else "")
        if name is None:
            self.coord.refuse_source("reducer_auth_failed", "a reducer call without a reducer session",
                                     source_of(context.peer()))
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "not a reducer node's session: register with the reducer credential the operator made")
        return name

    def RegisterReducer(self, request, context):
        source = self._arrival(request, context, "reducer")
        if not (0 < len(request.name) <= MAX_ID_LEN) or len(request.credential) > 256 or len(request.maddrs) > 16 \
                or any(len(m) > 256 for m in request.maddrs):
            self._invalid(context, None, "reducer name, credential or addresses out of range")
        peer_id = self._peer_id(context, None, request.peer_id)
        session = self.coord.reducer_nodes.register(request.name, request.credential, peer_id, list(request.maddrs))
        if session is None:
            self.coord.refuse_source("reducer_auth_failed", f"a reducer registration as {request.name!r} with a "
                                     "wrong credential", source)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong reducer name or credential: make one with "
                                                           "`gptswarm reducer-credential` on the coordinator's machine")
        log.info("reducer node %s registered from %s as hivemind peer %s", request.name, source, peer_id)
        return pb.RegisterReducerResponse(session=session, **self.coord.reducer_config())

    def GetReduction(self, request, context):
        name = self._reducer(context)
        if request.weights_of:
            found = self.coord.reduction_weights(name, self._count(context, None, request.round, "round"))
        else:
            after = None if request.first else self._count(context, None, request.after_round, "round")
            found = self.coord.reduction(name, after_round=after, wait=self._real(context, None, request.wait,
                                                                                    "seconds to wait", 30.0))
        return pb.Reduction(found=True, **found) if found else pb.Reduction(found=False)

    def ReportReduction(self, request, context):
        name = self._reducer(context)
        if len(request.outcome_json) > MAX_REPORT or len(request.error) > 1000:
            self._invalid(context, None, "a reduction report out of range")
        round_ = self._count(context, None, request.round, "round")
        current = self.coord.round_view().round
        if not current - 4 <= round_ <= current:  # a report is of the round averaging now (or a late one)
            self._invalid(context, None, f"a report of round {round_}, which is not averaging (round {current} is)")
        self.coord.reducer_nodes.report(name, round_, request.ok, request.error, request.outcome_json)
        return pb.ReductionReportResponse()

    def GetRoundResult(self, request, context):
        w = self._worker(context)
        return pb.RoundResult(**self.coord.round_result(self._count(context, w, request.round, "round"), w["id"]))

    def GetCheckpoint(self, request, context):
        w = self._worker(context)
        files, round_, theta_hash = self.coord.open_checkpoint()

        def chunks():
            try:
                for name, f in files:
                    size = os.fstat(f.fileno()).st_size
                    first = True
                    while True:
                        data = f.read(CHUNK)
                        if not data and not first:
                            break
                        yield pb.CheckpointChunk(file=name, data=data, round=round_, theta_hash=theta_hash, size=size)
                        first = False
            finally:
                for _, f in files:
                    f.close()

        try:
            return self._stream(context, w, chunks())
        except BaseException:
            for _, f in files:
                f.close()
            raise

    def Leave(self, request, context):
        w = self._worker(context)
        self.coord.leave(w["id"])
        log.info("worker %s (%s) left", w["id"], w["name"])
        return pb.LeaveResponse()


def make_server(coord, config):
    """A started grpc.Server serving the coordinator and health (and reflection if asked) on
    config.listen, over TLS with coord.tls (certificate PEM, key PEM) unless config.plaintext;
    returns (server, service, bound port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.rpc_threads, thread_name_prefix="grpc"),
                         maximum_concurrent_rpcs=config.max_concurrent_rpcs,
                         options=[("grpc.max_receive_message_length", MAX_REQUEST),
                                  ("grpc.max_metadata_size", 16 << 10)])
    service = CoordinatorService(coord)
    pb_grpc.add_CoordinatorServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.grpc_reflection:
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if config.plaintext:
            port = server.add_insecure_port(config.listen)
        else:
            cert, key = coord.tls
            port = server.add_secure_port(config.listen, grpc.ssl_server_credentials([(key, cert)]))
    except RuntimeError:
        port = 0
    if port == 0:
        raise UserError(f"cannot listen on {config.listen}: the address is in use or not available here")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, service, port

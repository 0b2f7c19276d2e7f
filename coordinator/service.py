"""The coordinator's gRPC service (proto/gptswarm.proto), plus grpc health and reflection."""

import hmac
import json
import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gptswarm import __version__
from gptswarm.coordinator.reachability import is_reachable
from gptswarm.errors import UserError
from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc

log = logging.getLogger("gptswarm.coordinator")
CHUNK = 1 << 20
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coord):
        self.coord = coord  # coordinator.server.Coordinator: ledger, settings, round state

    # --- authentication ---

    def _worker(self, context):
        md = dict(context.invocation_metadata())
        auth = md.get("authorization", "")
        session = auth[7:] if auth.startswith("Bearer ") else ""
        worker = self.coord.ledger.worker_for_session(session) if session else None
        if worker is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or invalid session: join with the swarm token first")
        if worker["left_at"] is not None:
            worker = self.coord.come_back(worker)
        return worker

    def Join(self, request, context):
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this worker speaks gptswarm protocol v{request.protocol_version} but the coordinator "
                          f"speaks v{PROTOCOL_VERSION} (gptswarm {__version__}): install the same gptswarm version")
        if not request.token or not hmac.compare_digest(request.token.encode(), self.coord.token.encode()):
            self.coord.ledger.event("auth_failed", f"join refused for {request.name[:64]!r}: wrong or missing token")
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "wrong or missing swarm token: use the --token printed by `gptswarm coordinator`")
        name = (request.name or "anonymous").strip()[:64]
        worker_id, session = self.coord.add_worker(name, request.device[:128], request.peer_id[:128],
                                                   request.client_mode)
        log.info("worker %s (%s) joined from %s", worker_id, name, context.peer())
        return pb.JoinResponse(worker_id=worker_id, session=session, run_id=self.coord.settings.run_id,
                               protocol_version=PROTOCOL_VERSION)

    def GetRunConfig(self, request, context):
        self._worker(context)
        c = self.coord
        s = c.settings
        shards = {k: v for k, v in c.shard_set.manifest().items() if k != "shards"}
        return pb.RunConfig(
            run_id=s.run_id, model_config_json=json.dumps(s.model), train_config_json=json.dumps(s.train),
            tokenizer_json=c.tokenizer.to_str(), shards_json=json.dumps(shards),
            tokens_per_round=s.tokens_per_round, max_tokens=s.max_tokens, compression=s.compression,
            outer_lr=s.outer_lr, outer_momentum=s.outer_momentum,
            initial_peers=c.initial_peers, averaging_prefix=c.averaging_prefix,
            averaging_timeout=c.config.averaging_timeout, heartbeat_interval=c.config.heartbeat_interval,
            matchmaking_time=c.config.matchmaking_time)

    def LeaseShard(self, request, context):
        w = self._worker(context)
        ok, reason = self.coord.may_train(w, request.round)
        if not ok:
            return pb.LeaseResponse(granted=False, reason=reason, retry_after=self.coord.config.heartbeat_interval)
        lease = self.coord.ledger.lease(w["id"], request.round)
        if lease is None:
            return pb.LeaseResponse(granted=False, reason="no shards available: all are leased, waiting for reports",
                                    retry_after=self.coord.config.heartbeat_interval)
        return pb.LeaseResponse(granted=True, **lease)

    def Heartbeat(self, request, context):
        w = self._worker(context)
        c = self.coord
        deadline, lost = c.ledger.heartbeat(
            w["id"], round_=request.round, round_tokens=request.round_tokens, tps=request.tokens_per_second,
            state=request.state[:32], reason=request.reason[:200], lease_ids=list(request.lease_ids),
            bytes_sent=request.bytes_sent, loss=request.loss or None)
        r = c.round_view()
        may, _ = c.may_train(w, r["round"])
        return pb.HeartbeatResponse(round=r["round"], phase=r["phase"], theta_hash=r["theta_hash"], may_train=may,
                                    lease_deadline=deadline, expired_lease_ids=lost,
                                    tokens_trained=r["tokens_trained"], finished=r["finished"],
                                    swarm_round_tokens=c.ledger.round_tokens(r["round"]),
                                    swarm_tokens_per_second=c.ledger.swarm_tokens_per_second(),
                                    tokens_per_round=c.settings.tokens_per_round)

    def GetShard(self, request, context):
        self._worker(context)
        shards = self.coord.train_shards
        if request.shard_index >= len(shards):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no shard {request.shard_index} (run has {len(shards)})")
        raw = shards[request.shard_index].tokens.tobytes()
        for i in range(0, len(raw), CHUNK):
            yield pb.DataChunk(data=raw[i:i + CHUNK])

    def ReportShard(self, request, context):
        w = self._worker(context)
        if not self.coord.ledger.included(request.round, w["id"]):
            return pb.ReportResponse(accepted=False, detail=f"round {request.round} did not include this worker's "
                                     "contribution; release the lease instead")
        ok, detail = self.coord.ledger.report(w["id"], request.lease_id, request.round, request.tokens,
                                              request.loss)
        return pb.ReportResponse(accepted=ok, detail=detail)

    def ReleaseLeases(self, request, context):
        w = self._worker(context)
        return pb.ReleaseResponse(released=self.coord.ledger.release(w["id"], set(request.lease_ids)))

    def GetRoundResult(self, request, context):
        w = self._worker(context)
        return pb.RoundResult(**self.coord.round_result(request.round, w["id"]))

    def GetCheckpoint(self, request, context):
        self._worker(context)
        files, round_, theta_hash = self.coord.open_checkpoint()
        try:
            for name, f in files:
                first = True
                while True:
                    data = f.read(CHUNK)
                    if not data and not first:
                        break
                    yield pb.CheckpointChunk(file=name, data=data, round=round_, theta_hash=theta_hash)
                    first = False
        finally:
            for _, f in files:
                f.close()

    def CheckReachability(self, request, context):
        self._worker(context)
        ok, detail = is_reachable(request.peer_id, list(request.addrs)[:8])
        return pb.ReachabilityResponse(reachable=ok, detail=detail)

    def Leave(self, request, context):
        w = self._worker(context)
        self.coord.ledger.leave(w["id"])
        log.info("worker %s (%s) left", w["id"], w["name"])
        return pb.LeaveResponse()


def make_server(coord, listen, max_workers=32):
    """A started grpc.Server on `listen` serving the coordinator, health and reflection; returns
    (server, bound port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[("grpc.max_receive_message_length", 16 << 20)])
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(coord), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise UserError(f"cannot listen on {listen}: the address is in use or not available here")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port

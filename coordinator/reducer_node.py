"""`gptswarm reducer`: one of the operator's reducer nodes (docs/architecture.md "Scale").

It registers with the coordinator over the pinned TLS channel with a credential of its own
(`gptswarm reducer-credential`, made on the coordinator's machine), then loops: it asks for the
next round whose group names it, reduces its fraction of every tensor with the same RoundReducer
the coordinator uses (the reducer's validation, the robust rule or the mean, one reply's bytes
for every member), weighing each member by the final weight the coordinator gives when the
member's stream opens, and reports each member's part scores back. It keeps no state between
rounds but the robust rule's history (reset when its place among the nodes changes).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import click
import grpc

from gptswarm import __version__
from gptswarm.errors import UserError
from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc
from gptswarm.rounds.averaging import Group, RoundReducer
from gptswarm.rounds.p2p import P2PNode
from gptswarm.rounds.reports import report
from gptswarm.rounds.theta import theta_views
from gptswarm.transport import channel

log = logging.getLogger("gptswarm.reducer")
POLL_SECONDS = 10.0  # the longest one question for the next round waits at the coordinator
GROUP_WAIT = 10.0  # seconds a member's stream may wait for its round here (it may dial before we heard)
RETRY = 2.0


@dataclass(frozen=True)
class ReducerConfig:
    join: str
    name: str
    credential: str
    listen: str
    announce_host: str = ""
    state_dir: Path = Path(".")
    tls_fingerprint: str = ""
    plaintext: bool = False


class ReducerNodeRunner:
    """Threads: run() on the caller's; stop() from a signal handler or another thread (an Event)."""

    def __init__(self, config: ReducerConfig):
        self.config = config
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        node = P2PNode(listen=cfg.listen, announce_host=cfg.announce_host or None,  # hivemind before gRPC
                       identity_path=cfg.state_dir / "reducer_identity.key")
        try:
            while True:
                try:
                    ch = channel(cfg.join, pin=cfg.tls_fingerprint, plaintext=cfg.plaintext)
                    break
                except ConnectionError as e:
                    log.warning("coordinator unreachable (%s): retrying", e)
                    if self.stopping.wait(RETRY):
                        return
            try:
                self._serve(node, pb_grpc.CoordinatorStub(ch))
            finally:
                ch.close()
        finally:
            node.shutdown()

    def _register(self, node: P2PNode, stub: pb_grpc.CoordinatorStub) -> pb.RegisterReducerResponse:
        cfg = self.config
        maddrs = node.maddrs()
        if not maddrs:
            raise UserError(f"the reducer's hivemind peer has no address members can dial (--listen {cfg.listen})")
        while not self.stopping.is_set():
            try:
                return stub.RegisterReducer(pb.RegisterReducerRequest(
                    protocol_version=PROTOCOL_VERSION, name=cfg.name, credential=cfg.credential,
                    peer_id=str(node.peer_id), maddrs=maddrs, software_version=__version__), timeout=15)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION,
                                grpc.StatusCode.INVALID_ARGUMENT):
                    raise UserError(f"the coordinator refused this reducer: {e.details()}") from None
                log.warning("coordinator unreachable (%s): retrying", e.code().name)
                self.stopping.wait(RETRY)
        raise UserError("stopped")

    def _serve(self, node: P2PNode, stub: pb_grpc.CoordinatorStub) -> None:
        welcome = self._register(node, stub)
        auth = [("authorization", f"Bearer {welcome.session}")]
        template = theta_views(GPT(GPTConfig(**json.loads(welcome.model_config_json))))
        reducer = RoundReducer(node, template, prefix=welcome.averaging_prefix, compression=welcome.compression,
                               aggregation=welcome.aggregation, sender_timeout=welcome.sender_timeout,
                               on_refused=lambda peer, why: log.warning("refused %s: %s", peer, why),
                               topk_fraction=welcome.topk_fraction, group_wait=GROUP_WAIT)
        log.info("reducer node %s registered as hivemind peer %s at %s (run %s, %s, %s)", self.config.name,
                 node.peer_id, ", ".join(node.maddrs()), welcome.run_id, welcome.compression, welcome.aggregation)
        after, first, place = 0, True, None
        try:
            while not self.stopping.is_set():
                try:
                    red = stub.GetReduction(pb.ReductionRequest(after_round=after, first=first, wait=POLL_SECONDS),
                                            metadata=auth, timeout=POLL_SECONDS + 15)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAUTHENTICATED:  # the coordinator restarted: register again
                        welcome = self._register(node, stub)
                        auth = [("authorization", f"Bearer {welcome.session}")]
                        after, first = 0, True  # (its rounds may have gone back: a rollback)
                    else:
                        log.warning("coordinator unreachable (%s): retrying", e.code().name)
                        self.stopping.wait(RETRY)
                    continue
                if not red.found:
                    continue
                if (red.index, len(red.reducers)) != place and reducer.history is not None:
                    reducer.history = type(reducer.history)()  # other parts are ours now: their history is not
                place = (red.index, len(red.reducers))
                after, first = red.round, False
                self._reduce(reducer, stub, auth, red, welcome)
        finally:
            reducer.shutdown()

    def _reduce(self, reducer: RoundReducer, stub: pb_grpc.CoordinatorStub, auth: list, red: pb.Reduction,
                welcome: pb.RegisterReducerResponse) -> None:
        group = Group(red.round, {m.peer_id: (m.worker_id, m.weight) for m in red.members}, group_id=red.group_id)

        def final_weights() -> dict[str, int]:
            got = stub.GetReduction(pb.ReductionRequest(round=red.round, weights_of=True), metadata=auth, timeout=10)
            return {m.peer_id: m.weight for m in got.members if m.final}

        outcome = reducer.reduce(group, welcome.averaging_timeout, reducers=[n.peer_id for n in red.reducers],
                                 coordinator=welcome.coordinator_peer_id, final_weights=final_weights)
        log.info("round %d: reduced part %d of %d for %d member(s): %s", red.round, red.index + 1, len(red.reducers),
                 len(red.members), "ok" if outcome.ok else outcome.error,
                 extra={"fields": {"event": "reduction", "round": red.round, "ok": outcome.ok,
                                   "members": len(red.members), "bytes_in": outcome.bytes_received,
                                   "bytes_out": outcome.bytes_sent}})
        try:
            stub.ReportReduction(pb.ReductionReport(round=red.round, ok=outcome.ok, error=outcome.error,
                                                    outcome_json=report(outcome)), metadata=auth, timeout=15)
        except grpc.RpcError as e:
            log.warning("round %d: the report did not reach the coordinator: %s", red.round, e.code().name)


@click.command()
@click.option("--join", envvar="GPTSWARM_JOIN", required=True, metavar="HOST:PORT",
              help="The coordinator's gRPC address, as it printed it.")
@click.option("--name", envvar="GPTSWARM_REDUCER_NAME", required=True,
              help="This reducer node's name, the one its credential was made for.")
@click.option("--credential-file", envvar="GPTSWARM_REDUCER_CREDENTIAL_FILE", type=click.Path(dir_okay=False, exists=True),
              help="File holding the credential `gptswarm reducer-credential` printed on the coordinator's machine; "
                   "or set GPTSWARM_REDUCER_CREDENTIAL (never on the command line). The swarm token is not one.")
@click.option("--listen", envvar="GPTSWARM_REDUCER_LISTEN", default="0.0.0.0:7735", show_default=True,
              metavar="HOST:PORT", help="Where workers dial this node's hivemind peer (open it in the firewall).")
@click.option("--announce-host", envvar="GPTSWARM_ANNOUNCE_HOST", default="",
              help="The public host or IP workers should dial, if not the one --listen binds.")
@click.option("--state-dir", envvar="GPTSWARM_STATE_DIR", default="gptswarm-reducer", show_default=True,
              type=click.Path(file_okay=False), help="Keeps this node's hivemind identity across restarts.")
@click.option("--tls-fingerprint", envvar="GPTSWARM_TLS_FINGERPRINT", metavar="sha256:HEX",
              help="The coordinator's certificate fingerprint (as its join command shows it).")
@click.option("--plaintext", envvar="GPTSWARM_PLAINTEXT", is_flag=True,
              help="Talk to the coordinator without TLS: only for one on this machine (loopback tests).")
@click.option("--json-logs", envvar="GPTSWARM_JSON_LOGS", is_flag=True, help="One JSON object per log line.")
def reducer(join: str, name: str, credential_file: str | None, listen: str, announce_host: str, state_dir: str,
            tls_fingerprint: str | None, plaintext: bool, json_logs: bool) -> None:
    """Run one of the operator's reducer nodes: it reduces an equal fraction of every round's
    values (the robust rule or the mean, as the run says) for the coordinator, which then needs
    less CPU and link per worker (docs/architecture.md "Scale"). A reducer is trusted with the
    average: run it only on the operator's machines, with a credential made for it by
    `gptswarm reducer-credential --state-dir DIR --name NAME` on the coordinator's machine.
    SIGTERM or Ctrl+C stops it between rounds (a round it is reducing fails)."""
    import os
    import signal

    from gptswarm.logs import setup_logging

    credential = (Path(credential_file).read_text().strip() if credential_file
                  else os.environ.get("GPTSWARM_REDUCER_CREDENTIAL", "").strip())
    if not credential:
        raise click.UsageError("no credential: --credential-file FILE or GPTSWARM_REDUCER_CREDENTIAL")
    if tls_fingerprint and plaintext:
        raise click.UsageError("--tls-fingerprint and --plaintext contradict each other")
    setup_logging(json_logs)
    runner = ReducerNodeRunner(ReducerConfig(join=join, name=name, credential=credential, listen=listen,
                                             announce_host=announce_host, state_dir=Path(state_dir),
                                             tls_fingerprint=tls_fingerprint or "", plaintext=plaintext))
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    signal.signal(signal.SIGINT, lambda *_: runner.stop())
    runner.run()

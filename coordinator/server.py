"""The Coordinator: one object that owns the ledger, the hivemind peer (the reducer of every round's
averaging, unless the operator's reducer nodes are live: reducers.py), the gRPC server, the status
page, the round keeper (rounds.py: a round's life, from its tokens to its commit) and the safety
gate (gate.py). start() / shutdown().

The gRPC service (service.py) checks each request's form and asks this object, never the ledger:
what a worker may do is decided here, from the ledger and one snapshot of the current round.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from gptswarm.coordinator import run as runs
from gptswarm.coordinator.gate import SafetyGate
from gptswarm.coordinator.http import StatusServer
from gptswarm.coordinator.ledger import Ledger
from gptswarm.coordinator.reducers import ReducerNodes, ReducerRegistry
from gptswarm.coordinator.replays import Replays
from gptswarm.coordinator.rounds import RoundKeeper, RoundView
from gptswarm.coordinator.scoring import Scorer
from gptswarm.coordinator.service import make_server
from gptswarm.private import private_dir
from gptswarm.rounds.averaging import ReducerNode, RoundContributor, RoundReducer
from gptswarm.rounds.p2p import P2PNode
from gptswarm.rounds.theta import (
    latest_dir,
    load_theta,
    point_latest,
    round_dir,
    theta_views,
)
from gptswarm.states import LeaseState, Phase, Place, RoundState
from gptswarm.transport import coordinator_certificate, fingerprint

log = logging.getLogger("gptswarm.coordinator")
# the fastest any one machine could train (a generous bound on a 2026 accelerator's dense FLOP/s):
# a worker's claimed tokens per second of a round are clamped to this over the model's FLOPs per token
MAX_WORKER_FLOPS = 1e16
# near a round's end workers beat faster, so that their tokens end it and they learn of the averaging at
# once; all of them together at most this many times a second (each heartbeat is a gRPC call over TLS and
# a ledger transaction: 64 workers every 0.1 s took the 2-core benchmark machine's CPU from the round's end)
FAST_BEATS_PER_SECOND = 100
FAST_BEAT_MIN = 0.1  # seconds: no worker faster than this


def may_train(worker: dict, view: RoundView, round_: int) -> tuple[bool, str]:
    """The one rule of who may train in round round_ now (the ledger's anyone_may_train is its
    SQL form over every worker; a lease's own transaction checks the quarantine again)."""
    if view.finished:
        return False, "the run is finished"
    if worker["quarantined_at"] is not None:
        return False, f"quarantined: {worker['quarantine_reason']}; the operator can lift it"
    if worker["eligible_round"] > view.round:
        return False, "waiting for the round: joined while this round was under way"
    if view.phase != Phase.TRAINING and not in_group(worker, view):
        return False, "waiting for the round: averaging in progress"
    if round_ != view.round:
        return False, f"round {round_} is over; the current round is {view.round}"
    return True, ""


def in_group(worker: dict, view: RoundView) -> bool:
    """Is the worker a member of the round that averages now? Its members train ahead for the
    next round meanwhile (they carry that progress over onto the new theta; a newcomer could not)."""
    member = view.group.member(worker["peer_id"] or "") if view.group is not None else None
    return member is not None and member[0] == worker["id"]


def node_fields(node: ReducerNode) -> dict:
    """A reducer node as the ReducerNode message's fields."""
    return {"peer_id": node.peer_id, "maddrs": list(node.maddrs), "name": node.name}


class Coordinator:
    """state_dir: a run made by run.new_run; config: CoordinatorConfig; token: a new swarm token
    (rotates the saved one), or None to keep the saved one; rotate_token: make a new random one.
    A rotated token revokes every session.

    Threads: gRPC and HTTP threads call the methods below; the round state is the round keeper's
    (read as snapshots), the ledger serializes its own transactions; the only field of its own
    that two threads touch, the online count of fast_beat_seconds, is a tuple replaced whole."""

    def __init__(self, state_dir: Path, config: Any, *, token: str | None = None, rotate_token: bool = False):
        self.state_dir = private_dir(state_dir)
        self.config = config
        self.settings = runs.load_run(self.state_dir)
        self.token, rotated = runs.swarm_token(self.state_dir, token, rotate=rotate_token)
        self.shard_set = runs.read_shards(self.state_dir)
        self.train_shards = self.shard_set.split("train")
        cfg = config
        self.ledger = Ledger(self.state_dir / "ledger.sqlite", lease_seconds=cfg.lease_seconds,
                             heartbeat_interval=cfg.heartbeat_interval, max_leases=cfg.max_leases,
                             quarantine_after=cfg.quarantine_after, quarantine_window=cfg.quarantine_window)
        # the round the ledger last committed (a crash can come between the commit and `latest` moving)
        committed = round_dir(self.state_dir, self.ledger.get_meta("round", 0))
        model, self.tokenizer, meta, momentum = load_theta(committed if committed.is_dir() else latest_dir(self.state_dir))
        self.n_params = model.num_params(non_embedding=False)
        self.ledger.max_tokens_per_second = MAX_WORKER_FLOPS / model.flops_per_token()
        self.averaging_prefix = f"gptswarm-{self.settings.run_id}"
        seq = self.shard_set.example_len - 1 if self.shard_set.layout == "examples" else model.config.block_size
        self.gate = SafetyGate(state_dir=self.state_dir, ledger=self.ledger, val_shards=self.shard_set.split("val"),
                               shard_set=self.shard_set, max_rise=cfg.max_val_loss_rise, eval_tokens=cfg.eval_tokens,
                               on_val_loss=lambda loss: self.rounds.set_val_loss(loss))
        scorer = Scorer(shard_set=self.shard_set, train_shards=self.train_shards, seq=seq, names=list(theta_views(model)),
                        ledger=self.ledger, fraction=cfg.score_fraction) if cfg.score_fraction > 0 else None
        step_tokens = int(self.settings.train.get("batch_size", 1)) * seq
        self.replays = self._replays(step_tokens) if cfg.replay_fraction > 0 else None
        self.rounds = RoundKeeper(state_dir=self.state_dir, settings=self.settings, config=cfg, ledger=self.ledger,
                                  model=model, tokenizer=self.tokenizer, momentum=momentum, meta=meta,
                                  step_tokens=step_tokens, gate=self.gate, scorer=scorer, replays=self.replays)
        self.ledger.add_shards([(s.sha256, len(s)) for s in self.train_shards])
        view = self.rounds.view()
        self.ledger.recover(view.round, view.theta_hash)
        if rotated:
            self.ledger.revoke_sessions("the swarm token was rotated")
        point_latest(self.state_dir, view.checkpoint_round)
        self.node: P2PNode | None = None
        self.reducer: RoundReducer | None = None
        self.reducer_nodes = ReducerRegistry(self.ledger)  # the operator's reducer nodes (coordinator/reducers.py)
        self.server = self.service = self.http = self.tls = None
        self._online = (0, float("-inf"))  # workers online, and when counted (fast_beat_seconds)
        self.port = None

    def _replays(self, step_tokens: int) -> Replays | None:
        """The replays of this run (coordinator/replays.py): what a job needs to train a worker's round
        as the worker did (its TrainConfig is the run's, its schedule spanning the run's budget as the
        worker's does: worker/bootstrap.py)."""
        s = self.settings
        if float(s.model.get("dropout", 0.0)) > 0:
            log.warning("replays are off: the run's model has dropout, whose random draws a record does not hold")
            return None
        shards = {k: v for k, v in self.shard_set.manifest().items() if k not in ("shards", "format", "dtype")}
        run = {"model": s.model, "train": dict(s.train, max_iters=max(1, s.max_tokens // step_tokens)),
               "compression": s.compression, "topk_fraction": s.topk_fraction, "tokens_per_step": step_tokens,
               "shard_set": shards}
        return Replays(state_dir=self.state_dir, ledger=self.ledger, fraction=self.config.replay_fraction,
                       deadline=self.config.replay_deadline, run=run, record_bytes=16 * self.n_params + (64 << 20),
                       train_shards=self.train_shards)

    # --- lifecycle ---

    def start(self) -> Coordinator:
        cfg = self.config
        self.node = P2PNode(listen=cfg.p2p_listen, announce_host=cfg.announce_host or None,
                            identity_path=self.state_dir / "p2p_identity.key")
        self.reducer = RoundReducer(self.node, self.rounds.theta, prefix=self.averaging_prefix,
                                    compression=self.settings.compression, aggregation=self.settings.aggregation,
                                    sender_timeout=cfg.sender_timeout, on_refused=self._refused_peer,
                                    topk_fraction=self.settings.topk_fraction)
        self.tls = None if cfg.plaintext else coordinator_certificate(self.state_dir, cfg.tls_cert, cfg.tls_key)
        self.server, self.service, self.port = make_server(self, cfg)
        if cfg.http_listen:
            self.http = StatusServer(self, cfg.http_listen).start()
        contributor = RoundContributor(self.node, self.rounds.theta, prefix=self.averaging_prefix,
                                       compression=self.settings.compression, topk_fraction=self.settings.topk_fraction)
        self.rounds.start(self.reducer, ReducerNodes(self.reducer_nodes, contributor, self.rounds.theta))
        if self.replays is not None:
            self.replays.start()
        log.info("coordinator of run %s: gRPC on port %d, hivemind peer %s at %s, round %d", self.settings.run_id,
                 self.port, self.node.peer_id, ", ".join(self.node.maddrs()) or "?", self.rounds.view().round)
        return self

    def shutdown(self) -> None:
        self.rounds.close(timeout=self.config.averaging_timeout + 10)
        self.gate.close(timeout=120)  # the last round's evaluation is part of the run
        if self.replays is not None:
            self.replays.close()
        if self.http is not None:
            self.http.shutdown()
        if self.server is not None:
            self.server.stop(grace=2).wait()
            self.service.streams.close()
        if self.node is not None:
            self.node.shutdown()
        self.ledger.close()

    @property
    def tls_fingerprint(self) -> str | None:
        """sha256:<hex> of the certificate workers pin, or None in plaintext."""
        return fingerprint(self.tls[0]) if self.tls else None

    # --- the round, as the service and the status page read it ---

    def round_view(self) -> RoundView:
        return self.rounds.view()

    def round_target(self) -> int:
        return self.rounds.target()

    def fast_beat_seconds(self) -> float:
        """The least time between a worker's heartbeats near the round's end, for this swarm's size."""
        online, at = self._online
        now = time.monotonic()
        if now - at > 1.0:  # counted at most once a second
            online = self.ledger.online_count()
            self._online = (online, now)
        return max(FAST_BEAT_MIN, online / FAST_BEATS_PER_SECOND)

    def open_checkpoint(self) -> tuple[list, int, str]:
        """Open the current round's checkpoint files, with the round and theta hash they hold."""
        return self.rounds.checkpoint_files()

    # --- who is asking ---

    def authenticate(self, session: str) -> dict | None:
        """The worker whose live session this is (one that had left comes back), or None."""
        worker = self.ledger.worker_for_session(session, self.config.session_ttl) if session else None
        if worker is not None and worker["left_at"] is not None:
            worker_id = worker["id"]
            self.rounds.join_round(lambda current, started: self.ledger.come_back(
                worker_id, current_round=current, round_started=started))
            worker = self.ledger.worker(worker_id)
        return worker

    def add_worker(self, name: str, device: str, peer_id: str) -> tuple[str, str, str]:
        """A new worker: (worker_id, session, secret)."""
        return self.rounds.join_round(lambda current, started: self.ledger.add_worker(
            name=name, device=device, peer_id=peer_id, current_round=current, round_started=started))

    def resume_worker(self, worker_id: str, secret: str, peer_id: str) -> str | None:
        """A known worker proving its secret: a fresh session, or None."""
        return self.rounds.join_round(lambda current, started: self.ledger.resume_worker(
            worker_id, secret, peer_id=peer_id, current_round=current, round_started=started))

    def known_worker(self, worker_id: str) -> bool:
        return self.ledger.worker(worker_id) is not None

    def peer_owner(self, peer_id: str) -> str | None:
        """The worker that registered this hivemind peer id, if any still in the swarm."""
        return self.ledger.peer_owner(peer_id)

    def register_peer(self, worker_id: str, peer_id: str) -> tuple[bool, str]:
        return self.ledger.register_peer(worker_id, peer_id)

    def refuse(self, kind: str, detail: str, worker_id: str = "") -> None:
        """A refused claim: counted, and written as an event (at most once a minute per worker and kind)."""
        self.ledger.refuse(kind, detail, worker_id)

    def refuse_source(self, kind: str, detail: str, source: str) -> None:
        """A refused claim from a network source that is no worker (yet)."""
        self.ledger.refuse_source(kind, detail, source)

    def _refused_peer(self, peer_id: str, reason: str) -> None:
        """A hivemind peer was turned away from averaging (called on the p2p thread)."""
        self.refuse("averaging_refused", f"hivemind peer {peer_id[:60]} {reason}", self.ledger.peer_owner(peer_id) or "")

    # --- what a worker asks ---

    def lease(self, worker: dict, round_: int, finished: list[str], claims: dict[str, int]) -> dict | str:
        """A lease request: the leases it says it finished and its claims in round_ first, then a
        new lease (a dict of the LeaseResponse's fields) or why not (a string)."""
        view = self.rounds.view()
        if finished or claims:
            self.ledger.finish_leases(worker["id"], finished, current_round=view.round, round_=round_,
                                      lease_tokens=claims)
        ok, reason = may_train(worker, view, round_)
        return self.ledger.lease(worker["id"], round_) if ok else reason

    def heartbeat(self, worker: dict, *, round_: int, lease_tokens: dict[str, int], tps: float, state: str,
                  reason: str, lease_ids: list[str], bytes_sent: int, loss: float | None) -> dict:
        """A heartbeat: its claims are checked and recorded; returns the HeartbeatResponse's fields."""
        view = self.rounds.view()
        deadline, lost = self.ledger.heartbeat(
            worker["id"], current_round=view.round, round_=round_, lease_tokens=lease_tokens, tps=tps, state=state,
            reason=reason, lease_ids=lease_ids, bytes_sent=bytes_sent, loss=loss)
        tokens, target = self.ledger.round_tokens(view.round), self.rounds.target()
        self.rounds.reached(view, tokens, target)
        return dict(round=view.round, phase=view.phase, theta_hash=view.theta_hash,
                    may_train=may_train(worker, view, view.round)[0], lease_deadline=deadline, expired_lease_ids=lost,
                    tokens_trained=view.tokens_trained, finished=view.finished, swarm_round_tokens=tokens,
                    swarm_tokens_per_second=self.ledger.swarm_tokens_per_second(), tokens_per_round=target,
                    fast_beat_seconds=self.fast_beat_seconds())

    def shard_tokens(self, worker: dict, lease_id: str) -> bytes | None:
        """The tokens of the shard this worker holds an active lease on, or None (refused, counted)."""
        lease = self.ledger.lease_row(lease_id) if lease_id else None
        if lease is None or lease["worker_id"] != worker["id"] or lease["state"] != LeaseState.ACTIVE:
            self.refuse("shard_without_lease", "asked for a shard it holds no active lease on", worker["id"])
            return None
        return self.train_shards[lease["shard_idx"]].tokens.tobytes()

    def report(self, worker_id: str, lease_id: str, round_: int, loss: float) -> tuple[bool, str]:
        return self.ledger.report(worker_id, lease_id, round_, loss)

    def release(self, worker_id: str, lease_ids: set[str]) -> int:
        return self.ledger.release(worker_id, lease_ids)

    def leave(self, worker_id: str) -> None:
        self.ledger.leave(worker_id)

    def averaging_group(self, round_: int, worker: dict, claims: dict[str, int], commit: str = "") -> dict:
        """This worker's place in round round_'s averaging (the AveragingGroup message's fields).
        A member's final claims set its weight, before it can send a single part; commit: the sha256
        of its record of the round (rounds/replay.py)."""
        view = self.rounds.view()
        group = view.group
        if round_ < view.round:
            return {"state": Place.OVER, "detail": f"round {round_} is over"}
        if round_ > view.round or view.phase != Phase.AVERAGING or group is None or group.round != round_:
            return {"state": Place.WAIT, "retry_after": 0.2, "detail": f"round {round_} is not averaging yet"}
        member = group.member(worker["peer_id"] or "")
        if member is None or member[0] != worker["id"]:
            why = ("no hivemind peer id registered" if not worker["peer_id"] else
                   "it held no lease in this round" if worker["eligible_round"] <= round_ else
                   "it joined while the round was under way")
            return {"state": Place.NOT_MEMBER, "detail": f"not in round {round_}'s averaging group: {why}"}
        group.ask(worker["peer_id"], commit)
        weight = self.ledger.claim(worker["id"], round_, claims) if claims else member[1]
        assert self.reducer is not None and self.node is not None
        self.reducer.set_weight(group, worker["peer_id"], weight)
        return {"state": Place.MEMBER, "group_id": group.group_id, "reducer_peer_id": str(self.node.peer_id),
                "reducer_maddrs": self.node.maddrs(), "weight": weight,
                "reducers": [node_fields(n) for n in group.reducers]}

    # --- the operator's reducer nodes (coordinator/reducers.py) ---

    def reducer_config(self) -> dict:
        """What a reducer node needs to reduce this run's rounds (RegisterReducerResponse's fields)."""
        assert self.node is not None
        s, cfg = self.settings, self.config
        return {"run_id": s.run_id, "averaging_prefix": self.averaging_prefix, "compression": s.compression,
                "aggregation": s.aggregation, "topk_fraction": s.topk_fraction, "model_config_json": json.dumps(s.model),
                "sender_timeout": cfg.sender_timeout, "averaging_timeout": cfg.averaging_timeout,
                "coordinator_peer_id": str(self.node.peer_id)}

    def reduction(self, name: str, *, after_round: int | None, wait: float) -> dict | None:
        """The next round (after after_round; None: the one averaging now) whose group names the node
        `name`, waiting up to `wait` seconds for one: its fields for the Reduction message."""
        deadline = time.monotonic() + wait
        while True:
            view = self.rounds.view()
            group = view.group
            if group is not None and (after_round is None or group.round > after_round):
                names = [n.name for n in group.reducers]
                if name in names:
                    members = group.snapshot()
                    final = group.final_weights()
                    return {"round": group.round, "group_id": group.group_id,
                            "reducers": [node_fields(n) for n in group.reducers],
                            "index": names.index(name),
                            "members": [{"peer_id": p, "worker_id": w, "weight": final.get(p, t), "final": p in final}
                                        for p, (w, t) in members.items()]}
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def reduction_weights(self, name: str, round_: int) -> dict | None:
        """Round round_'s members and weights, for one of its reducer nodes (None: not such a round)."""
        group = self.rounds.view().group
        if group is None or group.round != round_ or name not in [n.name for n in group.reducers]:
            return None
        return self.reduction(name, after_round=round_ - 1, wait=0.0)

    def round_result(self, round_: int, worker_id: str) -> dict:
        """How round round_ ended for this worker (the RoundResult message's fields)."""
        view = self.rounds.view()
        if round_ >= view.round:
            return {"state": view.phase if round_ == view.round else RoundState.TRAINING, "included": False,
                    "theta_hash": "", "detail": "round in progress"}
        rows = self.ledger.round_rows(round_, round_ + 1)
        if round_ not in rows or round_ + 1 not in rows:
            return {"state": RoundState.FAILED, "included": False, "theta_hash": view.theta_hash,
                    "detail": "unknown round: resynchronize from the latest checkpoint"}
        return {"state": rows[round_]["state"], "included": self.ledger.included(round_, worker_id),
                "theta_hash": rows[round_ + 1]["theta_hash"] or "", "detail": rows[round_]["detail"] or "",
                "replay": self.ledger.replay_requested(round_, worker_id)}

    def upload_replay(self, worker_id: str, chunks: Any) -> tuple[bool, str]:
        """A worker's record of a round drawn for a replay (coordinator/replays.py): (accepted, why not)."""
        if self.replays is None:
            return False, "this coordinator replays nothing"
        return self.replays.receive(worker_id, chunks)

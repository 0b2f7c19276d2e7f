"""The Coordinator: one object that owns the ledger, the hivemind peer (the only reducer of every
round's averaging), the gRPC server and the round loop. start() / shutdown().

A round ends when the swarm's verified tokens reach its target (tokens_per_round, or inner_steps
for each worker training in it if that is more; or the round times out, or the epoch runs dry). Its averaging group is what the ledger says: every worker still in the swarm
that held a lease in the round, with the hivemind peer id it registered over its session, weighed
by its verified tokens. The round then commits all or nothing: the new theta is computed on a
copy, checked (finite) and written to its own checkpoint directory; one ledger transaction
credits the included contributions and starts the next round with the new theta hash (the commit
point); only then does the in-memory state move and checkpoints/latest point at the new round.
Its validation loss is measured afterwards, off the round's critical path, by a thread of its own
(the safety gate then takes a bad round back). While a round averages, its group's members may
lease shards: they train ahead for the next round (worker/loop.py, "overlap"), and claim those
tokens once it opens.
"""

import copy
import logging
import math
import shutil
import statistics
import threading
import time

import torch

from gptswarm.coordinator import run as runs
from gptswarm.coordinator.http import StatusServer
from gptswarm.coordinator.ledger import Ledger
from gptswarm.coordinator.service import make_server
from gptswarm.coordinator.status import NOT_LEARNING_ROUNDS, not_learning
from gptswarm.mingpt_core.data import eval_batches
from gptswarm.mingpt_core.trainer import evaluate_loss
from gptswarm.private import private_dir
from gptswarm.rounds.averaging import Group, RoundReducer
from gptswarm.rounds.outer import outer_step
from gptswarm.rounds.p2p import P2PNode
from gptswarm.rounds.theta import (latest_dir, load_theta, point_latest, round_dir, save_round,
                                   set_checkpoint_meta, theta_hash, theta_views)
from gptswarm.transport import coordinator_certificate, fingerprint

log = logging.getLogger("gptswarm.coordinator")
# the fastest any one machine could train (a generous bound on a 2026 accelerator's dense FLOP/s):
# a worker's claimed tokens per second of a round are clamped to this over the model's FLOPs per token
MAX_WORKER_FLOPS = 1e16
# the safety gate compares a round's validation loss with the median of the last VAL_LOSS_WINDOW evaluated
# rounds, the rejected ones included: a one-off jump is refused, but a level that honest training keeps
# for three rounds in a row becomes the baseline. (Against the best of the committed rounds only, a run
# near zero loss at a constant learning rate was refused round after round, for ever: seen at round 773
# of a long run on the addition task, with honest jumps from 0.0001 to 0.15-0.26.)
VAL_LOSS_WINDOW = 5
# near a round's end workers beat faster, so that their tokens end it and they learn of the averaging at
# once; all of them together at most this many times a second (each heartbeat is a gRPC call over TLS and
# a ledger transaction: 64 workers every 0.1 s took the 2-core benchmark machine's CPU from the round's end)
FAST_BEATS_PER_SECOND = 100
FAST_BEAT_MIN = 0.1  # seconds: no worker faster than this
VAL_LOSS_SLACK = 0.1  # plus this much (measured in clean runs: +15% between two rounds at a loss of 1.5; from
#                       0.0001 to 0.006 near zero, where relative changes mean nothing)


class RoundRejected(Exception):
    """The round's new theta fails the safety gate."""


class Background:
    """Runs fn(*args) in a thread of its own for the newest of the calls submitted: one submitted
    while another runs waits, and replaces any that was waiting (an older round's evaluation is
    not worth delaying the newest one for)."""

    def __init__(self, fn, name):
        self.fn, self.name = fn, name
        self.cond = threading.Condition()
        self.waiting, self.busy, self.closed, self.thread = None, False, False, None

    def submit(self, *args):
        with self.cond:
            self.waiting = args
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def _run(self):
        while True:
            with self.cond:
                while self.waiting is None and not self.closed:
                    self.cond.wait()
                if self.waiting is None:
                    return
                args, self.waiting, self.busy = self.waiting, None, True
            try:
                self.fn(*args)
            except Exception:
                log.exception("%s failed", self.name)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def wait(self, timeout=None):
        """Block until nothing runs or waits; False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: self.waiting is None and not self.busy, timeout)

    def close(self, timeout=None):
        """Finish what was submitted, then stop."""
        self.wait(timeout)
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Coordinator:
    """state_dir: a run made by run.new_run; config: CoordinatorConfig; token: a new swarm token
    (rotates the saved one), or None to keep the saved one; rotate_token: make a new random one.
    A rotated token revokes every session."""

    def __init__(self, state_dir, config, *, token=None, rotate_token=False):
        self.state_dir = private_dir(state_dir)
        self.config = config
        self.settings = runs.load_run(self.state_dir)
        self.token, rotated = runs.swarm_token(self.state_dir, token, rotate=rotate_token)
        self.shard_set = runs.read_shards(self.state_dir)
        self.train_shards = self.shard_set.split("train")
        self.val_shards = self.shard_set.split("val")
        cfg = config
        self.ledger = Ledger(self.state_dir / "ledger.sqlite", lease_seconds=cfg.lease_seconds,
                             heartbeat_interval=cfg.heartbeat_interval, max_leases=cfg.max_leases,
                             quarantine_after=cfg.quarantine_after, quarantine_window=cfg.quarantine_window)
        # the round the ledger last committed (a crash can come between the commit and `latest` moving)
        committed = round_dir(self.state_dir, self.ledger.get_meta("round", 0))
        self.model, self.tokenizer, meta, self.momentum = load_theta(
            committed if committed.is_dir() else latest_dir(self.state_dir))
        self.theta = theta_views(self.model)  # theta_global, sharing storage with self.model
        self.n_params = self.model.num_params(non_embedding=False)
        self.ledger.max_tokens_per_second = MAX_WORKER_FLOPS / self.model.flops_per_token()
        self.averaging_prefix = f"gptswarm-{self.settings.run_id}"
        seq = self.shard_set.example_len - 1 if self.shard_set.layout == "examples" else self.model.config.block_size
        self.step_tokens = int(self.settings.train.get("batch_size", 1)) * seq  # tokens of one inner step
        # round state, under self.lock: the round loop writes it, gRPC and HTTP threads read it
        self.lock = threading.RLock()
        self.checkpoint_round = int(meta.get("round", 0))  # the round whose directory holds theta
        self.tokens_trained = int(meta.get("tokens_trained", 0))
        self.theta_hash = theta_hash(self.theta)
        # rounds that failed after it kept its theta: go on from the ledger's round, if it has that theta
        ledger_round = self.ledger.get_meta("round", 0)
        same = self.ledger.round_rows(ledger_round).get(ledger_round, {}).get("theta_hash") == self.theta_hash
        self.round = max(ledger_round, self.checkpoint_round) if same else self.checkpoint_round
        self.phase = "training"
        self.group = None  # the averaging Group of the current round, while it averages
        self.round_workers = 0  # workers training in the current round (its target counts them)
        self.finished = self.tokens_trained >= self.settings.max_tokens
        self.val_loss = meta.get("val_loss")
        self.ledger.add_shards([(s.sha256, len(s)) for s in self.train_shards])
        self.ledger.recover(self.round, self.theta_hash)
        if rotated:
            self.ledger.revoke_sessions("the swarm token was rotated")
        point_latest(self.state_dir, self.checkpoint_round)
        self.round_started_at = time.time()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a heartbeat brought the round its tokens: end it now
        self.node = self.reducer = self.server = self.service = self.http = self.thread = self.tls = None
        self.evaluations = Background(self._evaluated, name="evaluation")
        self._online, self._online_at = 0, float("-inf")  # workers online, and when counted (fast_beat_seconds)
        self.port = None

    # --- lifecycle ---

    def start(self):
        cfg = self.config
        self.round_started_at = time.time()
        self.node = P2PNode(listen=cfg.p2p_listen, announce_host=cfg.announce_host or None,
                            identity_path=self.state_dir / "p2p_identity.key")
        self.reducer = RoundReducer(self.node, self.theta, prefix=self.averaging_prefix,
                                    compression=self.settings.compression, aggregation=self.settings.aggregation,
                                    sender_timeout=cfg.sender_timeout, on_refused=self._refused_peer,
                                    topk_fraction=self.settings.topk_fraction)
        self.tls = None if cfg.plaintext else coordinator_certificate(self.state_dir, cfg.tls_cert, cfg.tls_key)
        self.server, self.service, self.port = make_server(self, cfg)
        if cfg.http_listen:
            self.http = StatusServer(self, cfg.http_listen).start()
        self.thread = threading.Thread(target=self._round_loop, name="rounds", daemon=True)
        self.thread.start()
        log.info("coordinator of run %s: gRPC on port %d, hivemind peer %s at %s, round %d", self.settings.run_id,
                 self.port, self.node.peer_id, ", ".join(self.node.maddrs()) or "?", self.round)
        return self

    def shutdown(self):
        self._stop.set()
        self._wake.set()
        if self.thread is not None:
            self.thread.join(timeout=self.config.averaging_timeout + 10)
        self.evaluations.close(timeout=120)  # the last round's evaluation is part of the run
        if self.http is not None:
            self.http.shutdown()
        if self.server is not None:
            self.server.stop(grace=2).wait()
            self.service.streams.close()
        if self.node is not None:
            self.node.shutdown()
        self.ledger.close()

    @property
    def tls_fingerprint(self):
        """sha256:<hex> of the certificate workers pin, or None in plaintext."""
        return fingerprint(self.tls[0]) if self.tls else None

    # --- what the service asks ---

    def _round_started(self):
        """Tokens were already trained in the current round (a worker arriving now waits for the next)."""
        return self.phase == "averaging" or self.ledger.round_tokens(self.round) > 0

    def add_worker(self, name, device, peer_id):
        with self.lock:
            return self.ledger.add_worker(name=name, device=device, peer_id=peer_id, current_round=self.round,
                                          round_started=self._round_started())

    def resume_worker(self, worker_id, secret, peer_id):
        with self.lock:
            return self.ledger.resume_worker(worker_id, secret, peer_id=peer_id, current_round=self.round,
                                             round_started=self._round_started())

    def come_back(self, worker):
        with self.lock:
            self.ledger.come_back(worker["id"], current_round=self.round, round_started=self._round_started())
        return self.ledger.worker(worker["id"])

    def may_train(self, worker, round_):
        with self.lock:
            if self.finished:
                return False, "the run is finished"
            if worker["quarantined_at"] is not None:
                return False, f"quarantined: {worker['quarantine_reason']}; the operator can lift it"
            if worker["eligible_round"] > self.round:
                return False, "waiting for the round: joined while this round was under way"
            if self.phase != "training" and not self._in_group(worker):
                return False, "waiting for the round: averaging in progress"
            if round_ != self.round:
                return False, f"round {round_} is over; the current round is {self.round}"
            return True, ""

    def _in_group(self, worker):
        """Is the worker a member of the round that averages now? Its members train ahead for the
        next round meanwhile (they carry that progress over onto the new theta; a newcomer could not)."""
        group = self.group
        member = group.members.get(worker["peer_id"] or "") if group is not None else None
        return member is not None and member[0] == worker["id"]

    def round_target(self):
        """The tokens that end the current round (RunSettings.round_target, for the workers training in it)."""
        with self.lock:
            tokens_trained, workers = self.tokens_trained, self.round_workers
        return self.settings.round_target(tokens_trained, workers=workers, step_tokens=self.step_tokens)

    def round_reached(self, round_, tokens):
        """A heartbeat says round_ holds `tokens`: if that ends it, the round loop ends it now
        instead of at its next look."""
        with self.lock:
            open_ = round_ == self.round and self.phase == "training"
        if open_ and tokens >= self.round_target():
            self._wake.set()

    def fast_beat_seconds(self):
        """The least time between a worker's heartbeats near the round's end, for this swarm's size."""
        now = time.monotonic()
        if now - self._online_at > 1.0:  # counted at most once a second
            self._online, self._online_at = self.ledger.online_count(), now
        return max(FAST_BEAT_MIN, self._online / FAST_BEATS_PER_SECOND)

    def round_view(self):
        with self.lock:
            return {"round": self.round, "phase": self.phase, "theta_hash": self.theta_hash,
                    "tokens_trained": self.tokens_trained, "finished": self.finished}

    def averaging_group(self, round_, worker, claims):
        """This worker's place in round round_'s averaging (the AveragingGroup message's fields).
        A member's final claims set its weight, before it can send a single part."""
        with self.lock:
            group, current, phase = self.group, self.round, self.phase
        if round_ < current:
            return {"state": "over", "detail": f"round {round_} is over"}
        if round_ > current or phase != "averaging" or group is None or group.round != round_:
            return {"state": "wait", "retry_after": 0.2, "detail": f"round {round_} is not averaging yet"}
        member = group.members.get(worker["peer_id"] or "")
        if member is None or member[0] != worker["id"]:
            why = ("no hivemind peer id registered" if not worker["peer_id"] else
                   "it held no lease in this round" if worker["eligible_round"] <= round_ else
                   "it joined while the round was under way")
            return {"state": "not_member", "detail": f"not in round {round_}'s averaging group: {why}"}
        group.asked.setdefault(worker["peer_id"], time.time())
        weight = self.ledger.claim(worker["id"], round_, claims) if claims else member[1]
        self.reducer.set_weight(group, worker["peer_id"], weight)
        return {"state": "member", "group_id": group.group_id, "reducer_peer_id": str(self.node.peer_id),
                "reducer_maddrs": self.node.maddrs(), "weight": weight}

    def round_result(self, round_, worker_id):
        with self.lock:
            if round_ >= self.round:
                return {"state": self.phase if round_ == self.round else "training", "included": False,
                        "theta_hash": "", "detail": "round in progress"}
        rows = self.ledger.round_rows(round_, round_ + 1)
        if round_ not in rows or round_ + 1 not in rows:
            return {"state": "failed", "included": False, "theta_hash": self.theta_hash,
                    "detail": "unknown round: resynchronize from the latest checkpoint"}
        return {"state": rows[round_]["state"], "included": self.ledger.included(round_, worker_id),
                "theta_hash": rows[round_ + 1]["theta_hash"] or "", "detail": rows[round_]["detail"] or ""}

    def open_checkpoint(self):
        """Open the current round's checkpoint files, with the round and theta hash they hold."""
        with self.lock:
            d = round_dir(self.state_dir, self.checkpoint_round)
            files = [(p.name, open(p, "rb")) for p in sorted(d.iterdir())]
            return files, self.round, self.theta_hash

    def _refused_peer(self, peer_id, reason):
        """A hivemind peer was turned away from averaging (called on the p2p thread)."""
        owner = self.ledger.peer_owner(peer_id) or ""
        self.ledger.refuse("averaging_refused", f"hivemind peer {peer_id[:60]} {reason}", owner)

    # --- rounds ---

    def _round_loop(self):
        while not self._stop.is_set():
            self._wake.wait(min(0.5, self.config.heartbeat_interval / 2))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.ledger.expire()
                self._apply_rollback()
                if self.finished:
                    continue
                if self._round_due():
                    self._finish_round()
            except Exception:  # the coordinator must outlive any one bad round
                log.exception("round %d failed", self.round)
                with self.lock:
                    self.phase, self.group = "training", None

    def _round_due(self):
        """Has the current round reached its target (counting the workers training in it now), or
        must it end with the tokens it has (too late, the epoch ran dry, nobody may train)?"""
        tokens = self.ledger.round_tokens(self.round)
        workers = len(self.ledger.group_members(self.round, self.round_started_at))
        with self.lock:
            self.round_workers = workers
        late = time.time() - self.round_started_at > self.config.round_timeout
        return tokens >= self.round_target() or (tokens > 0 and (
            late or self._epoch_drained() or not self.ledger.anyone_may_train(self.round)))

    def _apply_rollback(self):
        """If the operator asked for it (`gptswarm rollback`), go back to a kept round's theta."""
        to_round = self.ledger.get_meta("rollback_to")
        if to_round is None:
            return
        d = round_dir(self.state_dir, to_round)
        if not d.is_dir():
            self.ledger.set_meta("rollback_to", None)
            log.warning("rollback to round %s refused: no checkpoint of that round is kept", to_round)
            return
        model, _, meta, momentum = load_theta(d)
        theta = theta_views(model)
        digest, tokens = theta_hash(theta), int(meta.get("tokens_trained", 0))
        r = self.round
        self.ledger.rollback(r, to_round=to_round, theta_hash=digest, tokens_trained=tokens)
        with self.lock:
            self.model, self.theta, self.momentum = model, theta, momentum
            self.round, self.theta_hash, self.checkpoint_round = r + 1, digest, to_round
            self.tokens_trained, self.val_loss = tokens, meta.get("val_loss")
            self.finished = self.tokens_trained >= self.settings.max_tokens
            self.round_started_at = time.time()
        point_latest(self.state_dir, to_round)
        log.warning("round %d: rolled back to round %d's theta (%s...), as the operator asked", r, to_round,
                    digest[:12])

    def _epoch_drained(self):
        """No shard left to lease and nobody training: the epoch's last shards wait for this round's
        average before they can be credited, so the round must end now."""
        return not self.ledger.shard_counts()["pending"] and not self.ledger.anyone_training()

    def _finish_round(self):
        r = self.round
        t_start = time.time()
        members = self.ledger.group_members(r, self.round_started_at)
        group = Group(r, {peer: (worker_id, tokens) for worker_id, peer, tokens in members})
        with self.lock:
            self.group, self.phase = group, "averaging"
        self.ledger.set_round_state(r, "averaging", group_size=len(members))
        log.info("round %d: %d tokens trained, averaging with %d worker(s)", r, self.ledger.round_tokens(r),
                 len(members))
        t0 = time.time()
        outcome = self.reducer.reduce(group, self.config.averaging_timeout)
        seconds = time.time() - t0
        # where the round's end went: forming the group, its members asking for their places, the all-reduce
        asked = dict(group.asked)  # a copy: a late member's question may still come in
        asked = max(asked.values(), default=t0) if len(asked) == len(group.members) else t0 + seconds
        parts = {"group": t0 - t_start, "matchmaking": min(asked - t0, seconds)}
        parts["all_reduce"] = seconds - parts["matchmaking"]
        for worker_id, lie in outcome.lies.items():
            self.ledger.refuse("weight_claimed", lie, worker_id)
        flagged = outcome.flagged
        for worker_id in flagged:
            log.warning("round %d: %s flagged: %s", r, worker_id, outcome.rejected.get(worker_id, ""))
        stats = outcome.stats
        left_out = round(stats.left_out_fraction(), 4) if stats is not None else None
        if stats is not None and stats.rescued:  # the rule's own signal, not the members'
            self.ledger.event("rule_rescued", f"round {r}: {stats.rescue_summary()}")
            log.warning("round %d: %s", r, stats.rescue_summary())
        detail, state = outcome.error, "failed"
        if outcome.ok:
            try:
                self._commit(r, outcome, seconds, flagged, parts, len(group.members), left_out)
            except RoundRejected as e:
                detail, state = str(e), "rejected"
            except Exception as e:  # nothing moved: the round fails as a whole
                log.exception("round %d: commit failed", r)
                detail = f"commit failed: {type(e).__name__}: {e}"
            else:
                return self._check_learning()
        excluded = {w: outcome.rejected.get(w, detail) for w, _ in group.members.values()}
        self.ledger.fail_round(r, excluded=excluded, detail=detail, averaging_seconds=seconds, state=state,
                               left_out=left_out)
        log.warning("round %d %s: %s", r, state, detail)
        with self.lock:
            self.round, self.phase, self.group = r + 1, "training", None
            self.round_started_at = time.time()
        self._check_learning()

    def _check_learning(self):
        """Rounds in a row that failed or left most values out: the swarm has stopped learning. Said
        once per streak, as an event and in the log (the status page's health and /metrics say it
        for as long as it lasts)."""
        streak, why = not_learning(self.ledger.finished_rounds(NOT_LEARNING_ROUNDS + 1))
        if streak == NOT_LEARNING_ROUNDS:
            self.ledger.event("not_learning", why[:300])
            log.warning("%s", why)

    def _commit(self, r, outcome, seconds, flagged, parts=None, members=0, left_out=None):
        """Round r's average is in: the next theta, all or nothing (see the module's docstring).
        parts: seconds of the round's end so far, by part (the outer step, the checkpoint and the
        ledger's commit are added, and logged with the round); members: the group's size; left_out:
        the fraction of the members' values the robust rule left out."""
        parts, t0 = dict(parts or {}), time.time()
        model = copy.deepcopy(self.model)
        theta = theta_views(model)
        momentum = {k: v.clone() for k, v in self.momentum.items()}
        outer_step(theta, momentum, outcome.averaged, self.settings.outer_lr, self.settings.outer_momentum)
        if not all(torch.isfinite(t).all() for t in theta.values()):
            raise RoundRejected("the outer step made theta non-finite")
        tokens = sum(outcome.included.values())
        losses = [w["loss"] for w in map(self.ledger.worker, outcome.included) if w and w["loss"] is not None]
        loss = sum(losses) / len(losses) if losses else None
        digest = theta_hash(theta)
        t1 = time.time()
        save_round(self.state_dir, model, self.tokenizer, self.settings, round_=r + 1,
                   tokens_trained=self.tokens_trained + tokens, momentum=momentum,
                   extra_meta={"train_loss": loss})
        t2 = time.time()
        try:
            self.ledger.commit_round(r, included=outcome.included, excluded=outcome.rejected, flagged=flagged,
                                     theta_hash=digest, averaging_seconds=seconds, loss=loss,
                                     bytes_sent=outcome.bytes_sent, left_out=left_out)
        except BaseException:
            shutil.rmtree(round_dir(self.state_dir, r + 1), ignore_errors=True)
            raise
        with self.lock:  # the commit point has passed: move the in-memory state with it
            self.model, self.theta, self.momentum = model, theta, momentum
            self.round, self.theta_hash, self.phase, self.group = r + 1, digest, "training", None
            self.checkpoint_round = r + 1
            self.tokens_trained += tokens
            self.round_started_at = time.time()
            self.finished = self.tokens_trained >= self.settings.max_tokens
        point_latest(self.state_dir, r + 1)
        self.evaluations.submit(r, copy.deepcopy(model))
        parts.update(outer_step=t1 - t0, checkpoint=t2 - t1, commit=time.time() - t2)
        log.info("round %d done: %d worker(s), %d tokens, averaging %.1f s", r, len(outcome.included), tokens,
                 seconds, extra={"fields": {"event": "round", "round": r, "members": members,
                                            "included": len(outcome.included),
                                            "seconds": {k: round(v, 4) for k, v in parts.items()}}})
        if self.finished:
            self.ledger.event("finished", f"run reached its budget of {self.settings.max_tokens} tokens")

    def _evaluated(self, r, model):
        """The evaluator's work (its own thread): round r's new theta on the validation shards, and
        the second half of the safety gate. A round whose loss jumps is rejected after the fact: the
        run goes back to the theta it started from (kept: the last 3 rounds always are), and
        workers follow through the hash check, as after an operator's rollback."""
        t0 = time.time()
        val_loss = self.evaluate(model)
        seconds = time.time() - t0
        try:
            self._check_val_loss(val_loss)
        except RoundRejected as e:
            self.ledger.reject_late(r, str(e), val_loss)
            if round_dir(self.state_dir, r).is_dir():
                self.ledger.request_rollback(r)
            log.warning("round %d rejected after its evaluation: %s; going back to its starting theta", r, e)
            return
        self.ledger.set_val_loss(r, val_loss)
        set_checkpoint_meta(self.state_dir, r + 1, val_loss=val_loss)
        with self.lock:
            self.val_loss = val_loss
        log.info("round %d: validation loss %.4f (%.2f s)", r, val_loss, seconds,
                 extra={"fields": {"event": "evaluation", "round": r, "seconds": round(seconds, 4)}})

    def _check_val_loss(self, val_loss):
        """The safety gate: a round whose theta evaluates much worse than the recent ones is refused."""
        if not math.isfinite(val_loss):
            raise RoundRejected(f"validation loss {val_loss}")
        recent = self.ledger.recent_val_losses(VAL_LOSS_WINDOW)
        if recent:
            typical = statistics.median(recent)
            if val_loss > typical * (1 + self.config.max_val_loss_rise) + VAL_LOSS_SLACK:
                raise RoundRejected(f"validation loss {val_loss:.4f} is more than {self.config.max_val_loss_rise:.0%} "
                                    f"(+{VAL_LOSS_SLACK}) above the median of the last {len(recent)} evaluated "
                                    f"rounds ({typical:.4f})")

    def evaluate(self, model):
        batches = eval_batches(self.val_shards, self.shard_set, model.config.block_size, 64, self.config.eval_tokens)
        return round(evaluate_loss(model, batches), 4)

"""A round's life on the coordinator, in one place: RoundKeeper.

A round ends when the swarm's verified tokens reach its target (tokens_per_round, or inner_steps
for each worker training in it if that is more; or the round times out, or the epoch runs dry).
Its averaging group is what the ledger says: every worker still in the swarm that held a lease in
the round, with the hivemind peer id it registered over its session, weighed by its verified
tokens. The round then commits all or nothing: the new theta is computed on a copy, checked
(finite) and written to its own checkpoint directory; one ledger transaction credits the included
contributions and starts the next round with the new theta hash (the commit point); only then does
the in-memory state move and checkpoints/latest point at the new round. Its validation loss is
measured afterwards, off the round's critical path, by the safety gate's thread (gate.py), which
takes a bad round back. While a round averages, its group's members may lease shards: they train
ahead for the next round (worker/exchange.py), and claim those tokens once it opens.
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from gptswarm.coordinator.gate import RoundRejected, SafetyGate
from gptswarm.coordinator.scoring import MIN_SCALE, WINDOW, Probe, Scorer, factor_of
from gptswarm.coordinator.status import NOT_LEARNING_ROUNDS, not_learning
from gptswarm.mingpt_core.model import GPT
from gptswarm.rounds.averaging import Group, Outcome, RoundReducer
from gptswarm.rounds.outer import outer_step
from gptswarm.rounds.replay import Taps
from gptswarm.rounds.theta import (
    load_theta,
    point_latest,
    round_dir,
    save_round,
    theta_hash,
    theta_views,
)
from gptswarm.states import Phase, RoundState, ShardState

if TYPE_CHECKING:
    from gptswarm.coordinator.ledger import Ledger
    from gptswarm.coordinator.reducers import ReducerNodes
    from gptswarm.coordinator.replays import Replays
    from gptswarm.coordinator.run import RunSettings

log = logging.getLogger("gptswarm.coordinator")
T = TypeVar("T")


@dataclass(frozen=True)
class RoundView:
    """The current round as one immutable snapshot (what the gRPC service and the status page read)."""
    round: int
    phase: Phase
    theta_hash: str
    tokens_trained: int  # the swarm's, at the round's start
    finished: bool  # the run reached its token budget
    started_at: float  # time.time() when the round began
    workers: int  # workers training in it (its target counts them)
    checkpoint_round: int  # the round whose checkpoint directory holds theta
    val_loss: float | None  # the last evaluated round's
    group: Group | None  # its averaging group, while it averages


class RoundKeeper:
    """The only writer of the current round, its phase, its group and theta.

    Threads: the round loop (`run`, its own thread) writes every field of the round's state (round,
    phase, group, workers, started_at, model, theta, momentum, theta_hash, checkpoint_round,
    tokens_trained, finished) and the gate's evaluation thread writes val_loss, both under
    self.lock (the loop reads its own fields without it: nobody else writes them); everyone else
    reads `view()`, an immutable RoundView, or theta through `checkpoint_files()`. The lock is never held across the ledger's or the averaging's calls but for
    `join_round`, which must see the phase and the round's tokens as one (the ledger takes its own
    lock inside; nothing takes them in the other order)."""

    def __init__(self, *, state_dir: Path, settings: RunSettings, config: Any, ledger: Ledger, model: GPT,
                 tokenizer: Any, momentum: dict, meta: dict, step_tokens: int, gate: SafetyGate,
                 scorer: Scorer | None = None, replays: Replays | None = None):
        self.state_dir, self.settings, self.config, self.ledger = state_dir, settings, config, ledger
        self.tokenizer, self.step_tokens, self.gate, self.scorer = tokenizer, step_tokens, gate, scorer
        self.replays = replays
        self.reducer: RoundReducer | None = None  # set by start(): the hivemind peer comes up after the ledger
        self.nodes: ReducerNodes | None = None
        self.lock = threading.RLock()
        self.model, self.momentum = model, momentum
        self.theta = theta_views(model)  # theta_global, sharing storage with self.model
        self.checkpoint_round = int(meta.get("round", 0))
        self.tokens_trained = int(meta.get("tokens_trained", 0))
        self.theta_hash = theta_hash(self.theta)
        # rounds that failed after it kept its theta: go on from the ledger's round, if it has that theta
        ledger_round = ledger.get_meta("round", 0)
        same = ledger.round_rows(ledger_round).get(ledger_round, {}).get("theta_hash") == self.theta_hash
        self.round = max(ledger_round, self.checkpoint_round) if same else self.checkpoint_round
        self.phase = Phase.TRAINING
        self.group: Group | None = None
        self.workers = 0
        self.finished = self.tokens_trained >= settings.max_tokens
        self.val_loss = meta.get("val_loss")
        self.started_at = time.time()
        self.stop = threading.Event()
        self.wake = threading.Event()  # a heartbeat brought the round its tokens: end it now
        self.thread: threading.Thread | None = None

    # --- what the other threads read ---

    def view(self) -> RoundView:
        with self.lock:
            return RoundView(self.round, self.phase, self.theta_hash, self.tokens_trained, self.finished,
                             self.started_at, self.workers, self.checkpoint_round, self.val_loss, self.group)

    def target(self) -> int:
        """The tokens that end the current round (RunSettings.round_target, for the workers training in it)."""
        with self.lock:
            tokens_trained, workers = self.tokens_trained, self.workers
        return self.settings.round_target(tokens_trained, workers=workers, step_tokens=self.step_tokens)

    def join_round(self, admit: Callable[[int, bool], T]) -> T:
        """admit(current_round, round_started) under the lock: a worker arriving once the round has
        tokens (or averages) waits for the next one."""
        with self.lock:
            started = self.phase == Phase.AVERAGING or self.ledger.round_tokens(self.round) > 0
            return admit(self.round, started)

    def reached(self, view: RoundView, tokens: int, target: int) -> None:
        """A heartbeat saw view's round hold `tokens` of its `target`: if that ends it, the loop ends it
        now instead of at its next look (a view the round has left behind wakes it for nothing more
        than a look)."""
        if view.phase == Phase.TRAINING and tokens >= target:
            self.wake.set()

    def checkpoint_files(self) -> tuple[list, int, str]:
        """Open the current round's checkpoint files: ([(name, file)], round, theta hash)."""
        with self.lock:
            d = round_dir(self.state_dir, self.checkpoint_round)
            return [(p.name, open(p, "rb")) for p in sorted(d.iterdir())], self.round, self.theta_hash

    def set_val_loss(self, val_loss: float) -> None:
        with self.lock:
            self.val_loss = val_loss

    # --- the loop ---

    def start(self, reducer: RoundReducer, nodes: ReducerNodes | None = None) -> None:
        """reducer: the coordinator's own; nodes: the operator's reducer nodes (a round reduces on them
        when any is live)."""
        self.reducer, self.nodes = reducer, nodes
        with self.lock:
            self.started_at = time.time()
        self.thread = threading.Thread(target=self.run, name="rounds", daemon=True)
        self.thread.start()

    def close(self, timeout: float) -> None:
        self.stop.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=timeout)

    def run(self) -> None:
        while not self.stop.is_set():
            self.wake.wait(min(0.5, self.config.heartbeat_interval / 2))
            self.wake.clear()
            if self.stop.is_set():
                break
            try:
                self.ledger.expire()
                self.apply_rollback()
                if self.finished:
                    continue
                if self.due():
                    self.finish()
            except Exception:  # the coordinator must outlive any one bad round
                log.exception("round %d failed", self.round)
                with self.lock:
                    self.phase, self.group = Phase.TRAINING, None

    def due(self) -> bool:
        """Has the current round reached its target (counting the workers training in it now), or
        must it end with the tokens it has (too late, the epoch ran dry, nobody may train)?"""
        r, started_at = self.round, self.started_at
        tokens = self.ledger.round_tokens(r)
        workers = len(self.ledger.group_members(r, started_at))
        with self.lock:
            self.workers = workers
        late = time.time() - started_at > self.config.round_timeout
        return tokens >= self.target() or (tokens > 0 and (
            late or self._epoch_drained() or not self.ledger.anyone_may_train(r)))

    def _epoch_drained(self) -> bool:
        """No shard left to lease and nobody training: the epoch's last shards wait for this round's
        average before they can be credited, so the round must end now."""
        return not self.ledger.shard_counts()[ShardState.PENDING] and not self.ledger.anyone_training()

    def apply_rollback(self) -> None:
        """If the operator (`gptswarm rollback`) or the gate asked for it, go back to a kept round's theta."""
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
            self.started_at = time.time()
        point_latest(self.state_dir, to_round)
        log.warning("round %d: rolled back to round %d's theta (%s...), as the operator asked", r, to_round,
                    digest[:12])

    def finish(self) -> None:
        """End the current round: its group averages, then it commits or fails as a whole."""
        assert self.reducer is not None, "start() first"
        r = self.round
        t_start = time.time()
        reducers = self.nodes.for_round(r) if self.nodes is not None else ()
        probe, t_probe = None, time.time()
        if self.scorer is not None and not reducers:  # the reference gradients, before anyone sends (the
            # members go on training and claiming meanwhile: the round's phase has not changed yet)
            scored = self.ledger.group_members(r, self.started_at)
            probe = self.scorer.probe(self.model, r, {worker_id: tokens for worker_id, _, tokens in scored})
        t_scoring = time.time() - t_probe
        members = self.ledger.group_members(r, self.started_at)
        witness = None  # the members drawn for a replay, and the samples the reducer keeps of theirs
        if self.replays is not None and not reducers:
            witness = self.replays.witness([worker_id for worker_id, _, _ in members],
                                           sum(v.numel() for v in self.theta.values()))
        # a worker whose contributions scored low weighs less (coordinator/scoring.py)
        standings = self.ledger.standings([worker_id for worker_id, _, _ in members])
        scales = {peer: max(MIN_SCALE, factor_of(standings.get(worker_id))) for worker_id, peer, _ in members}
        group = Group(r, {peer: (worker_id, tokens) for worker_id, peer, tokens in members}, reducers=reducers,
                      scales=scales)
        with self.lock:
            self.group, self.phase = group, Phase.AVERAGING
        self.ledger.set_round_state(r, RoundState.AVERAGING, group_size=len(members))
        log.info("round %d: %d tokens trained, averaging with %d worker(s)%s", r, self.ledger.round_tokens(r),
                 len(members), f" on {len(reducers)} reducer node(s)" if reducers else "")
        t0 = time.time()
        if reducers:
            assert self.nodes is not None
            outcome = self.nodes.reduce(group, self.config.averaging_timeout)
        else:
            outcome = self.reducer.reduce(group, self.config.averaging_timeout,
                                          probe=Taps(probe, witness) if probe or witness else None)
        seconds = time.time() - t0
        scores = self._scored(r, outcome, group, probe)
        replayed = []
        if witness is not None and outcome.ok and self.replays is not None:  # asked for before the commit, which
            # makes RoundResult say so: the drawn members ask for the result once it is committed
            credited = [w for w in outcome.included if (scores.get(w) or (0, 0, 0, 0, 1.0))[4] > 0]
            replayed = self.replays.draw(r, witness, credited, group.commits(), self.theta)
        # where the round's end went: forming the group, its members asking for their places, the all-reduce
        asked = group.asked_times()
        last_asked = max(asked.values(), default=t0) if len(asked) == len(members) else t0 + seconds
        parts = {"group": t0 - t_start - t_scoring, "scoring": t_scoring, "matchmaking": min(last_asked - t0, seconds)}
        parts["all_reduce"] = seconds - parts["matchmaking"]
        for worker_id, lie in outcome.lies.items():
            self.ledger.refuse("weight_claimed", lie, worker_id)
        for worker_id in outcome.flagged:
            log.warning("round %d: %s flagged: %s", r, worker_id, outcome.rejected.get(worker_id, ""))
        stats = outcome.stats
        left_out = round(stats.left_out_fraction(), 4) if stats is not None else None
        if stats is not None and stats.rescued:  # the rule's own signal, not the members'
            self.ledger.event("rule_rescued", f"round {r}: {stats.rescue_summary()}")
            log.warning("round %d: %s", r, stats.rescue_summary())
        detail, state = outcome.error, RoundState.FAILED
        if outcome.ok:
            try:
                self.commit(r, outcome, seconds, parts, len(members), left_out, scores)
            except RoundRejected as e:
                detail, state = str(e), RoundState.REJECTED
            except Exception as e:  # nothing moved: the round fails as a whole
                log.exception("round %d: commit failed", r)
                detail = f"commit failed: {type(e).__name__}: {e}"
            else:
                return self.check_learning()
        if replayed and self.replays is not None:
            self.replays.dropped(r)
        excluded = {w: outcome.rejected.get(w, detail) for w, _ in group.snapshot().values()}
        self.ledger.fail_round(r, excluded=excluded, detail=detail, averaging_seconds=seconds, state=state,
                               left_out=left_out)
        log.warning("round %d %s: %s", r, state, detail)
        with self.lock:
            self.round, self.phase, self.group = r + 1, Phase.TRAINING, None
            self.started_at = time.time()
        self.check_learning()

    def _scored(self, r: int, outcome: Outcome, group: Group, probe: Probe | None) -> dict[str, tuple]:
        """Judge the round's scores (coordinator/scoring.py): a member whose standing is too low is
        flagged and left uncredited (its values went into the average before its score was known:
        they point the right way, only too little for its claim), and the credit of the rounds its
        standing judged is taken back at the commit. Returns {worker id: (ratio, leased, off,
        standing, factor, flagged)}."""
        if self.scorer is None or not outcome.ok:
            return {}
        members = {worker_id: weight for worker_id, weight in group.snapshot().values()}
        scores = self.scorer.judge(r, probe, members)
        for worker_id, score in scores.items():
            if score.flagged:
                outcome.included.pop(worker_id, None)
                outcome.rejected.setdefault(worker_id, f"flagged: {score.summary()}")
                outcome.flagged.add(worker_id)
                log.warning("round %d: %s flagged: %s", r, worker_id, score.summary())
        if not outcome.included:
            outcome.ok, outcome.error = False, "every contribution that reached the average was flagged by its score"
        return {w: (s.ratio, s.leased, s.off, s.standing, s.factor, s.flagged) for w, s in scores.items()
                if s.ratio is not None or s.standing is not None}

    def check_learning(self) -> None:
        """Rounds in a row that failed or left most values out: the swarm has stopped learning. Said
        once per streak, as an event and in the log (the status page's health and /metrics say it
        for as long as it lasts)."""
        streak, why = not_learning(self.ledger.finished_rounds(NOT_LEARNING_ROUNDS + 1))
        if streak == NOT_LEARNING_ROUNDS:
            self.ledger.event("not_learning", why[:300])
            log.warning("%s", why)

    def commit(self, r: int, outcome: Outcome, seconds: float, parts: dict | None = None, members: int = 0,
               left_out: float | None = None, scores: dict | None = None) -> None:
        """Round r's average is in: the next theta, all or nothing (see the module's docstring).
        parts: seconds of the round's end so far, by part (the outer step, the checkpoint and the
        ledger's commit are added, and logged with the round); members: the group's size; left_out:
        the fraction of the members' values the robust rule left out; scores: what the ledger keeps of
        the members' scores (_scored)."""
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
                   tokens_trained=self.tokens_trained + tokens, momentum=momentum, extra_meta={"train_loss": loss})
        t2 = time.time()
        try:
            self.ledger.commit_round(r, included=outcome.included, excluded=outcome.rejected, flagged=outcome.flagged,
                                     theta_hash=digest, averaging_seconds=seconds, loss=loss,
                                     bytes_sent=outcome.bytes_sent, left_out=left_out, scores=scores,
                                     revoke=[w for w, s in (scores or {}).items() if s[5]], revoke_rounds=WINDOW - 1)
        except BaseException:
            shutil.rmtree(round_dir(self.state_dir, r + 1), ignore_errors=True)
            raise
        with self.lock:  # the commit point has passed: move the in-memory state with it
            self.model, self.theta, self.momentum = model, theta, momentum
            self.round, self.theta_hash, self.phase, self.group = r + 1, digest, Phase.TRAINING, None
            self.checkpoint_round = r + 1
            self.tokens_trained += tokens
            self.started_at = time.time()
            self.finished = self.tokens_trained >= self.settings.max_tokens
        point_latest(self.state_dir, r + 1)
        self.gate.submit(r, copy.deepcopy(model))
        parts.update(outer_step=t1 - t0, checkpoint=t2 - t1, commit=time.time() - t2)
        log.info("round %d done: %d worker(s), %d tokens, averaging %.1f s", r, len(outcome.included), tokens,
                 seconds, extra={"fields": {"event": "round", "round": r, "members": members,
                                            "included": len(outcome.included),
                                            "seconds": {k: round(v, 4) for k, v in parts.items()}}})
        if self.finished:
            self.ledger.event("finished", f"run reached its budget of {self.settings.max_tokens} tokens")

"""A round's exchange with the swarm, on a thread of its own while the round loop trains ahead:
ask for our place in the round's averaging group -> contribute our pseudo-gradient to the
coordinator's hivemind peer, which returns the weighted average -> outer Nesterov step -> settle
with the coordinator's result (theta_global put back if the round did not commit; the shards it
included reported) -> keep or drop what was trained ahead meanwhile (ending())."""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar, cast

import torch
from hivemind.p2p import PeerID

from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.rounds.averaging import Outcome, RoundContributor
from gptswarm.rounds.codecs import ErrorFeedback
from gptswarm.rounds.outer import outer_step, pseudo_gradient
from gptswarm.rounds.replay import record_path
from gptswarm.states import Place, RoundState, WorkerState
from gptswarm.worker.client import CoordinatorClient
from gptswarm.worker.state import SharedState
from gptswarm.worker.sync import OuterState

log = logging.getLogger("gptswarm.worker")
RESULT_POLL = 0.05  # seconds between asking whether our round committed (the coordinator's commit takes ~0.1 s)
T = TypeVar("T")
Grads = dict[str, torch.Tensor]
Contribution = Callable[[Grads, int, int], tuple[Grads, float]]  # Worker.contribution(grad, weight, round_)


class Task(Generic[T]):
    """fn() on a thread of its own; get() returns its value, or raises its error on the caller's
    thread. The thread writes value and error, then sets `done`; the caller reads them only after
    `done` (get() waits for it): the value is handed over, never shared."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self.value = fn()
        except BaseException as e:  # noqa: BLE001 (raised on the loop's thread, by get())
            self.error = e
        finally:
            self.done.set()

    def get(self) -> T:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


@dataclass(frozen=True)
class Settled:
    """What an exchange hands back to the round loop."""
    outcome: Outcome
    result: pb.RoundResult | None  # the coordinator's; None: we stop
    outer: OuterState  # theta_global and the momentum after the round: stepped, put back, or as they were
    agrees: bool  # theta_global's hash is the coordinator's


class Exchange(Task[Settled]):
    """Round `round`'s exchange; group: our place in its averaging group; sent: theta_local when
    the pseudo-gradient was taken (None: we are not in the group). Its thread owns the OuterState it
    was given until get() returns it; round, group and sent never change; ahead_seconds is the round
    loop's alone."""

    def __init__(self, round_: int, group: pb.AveragingGroup, sent: Grads | None, fn: Callable[[], Settled]) -> None:
        self.round, self.group, self.sent = round_, group, sent
        self.ahead_seconds = 0.0  # in training steps for the next round, meanwhile
        super().__init__(fn, "exchange")


@dataclass(frozen=True)
class Ending:
    """What the round loop does once an exchange is over."""
    committed: bool  # the round committed our contribution and our theta_global agrees: load it
    resync: bool  # our theta_global is not the coordinator's: download it (else: load it as it is)
    keep: bool  # what was trained ahead starts the next round
    give_back: str  # why every lease of ours goes back ("": none does)


def ending(r: int, outcome: Outcome, result: pb.RoundResult, *, agrees: bool, ahead_seconds: float,
           finishing: bool) -> Ending:
    """Round r's exchange is over: keep what was trained ahead (ahead_seconds of steps) only if the
    round included us, committed, and we agree with it (and are not finishing); give every lease
    back if it did not include us, or if steps trained ahead are dropped."""
    done = result.state == RoundState.DONE
    committed = outcome.ok and done and agrees
    keep = committed and result.included and not finishing
    give_back = ""
    if not result.included:
        give_back = f"round {r} did not include our contribution ({result.detail or result.state})"
    elif not keep and ahead_seconds:
        give_back = f"the steps trained ahead during round {r}'s averaging are dropped"
    return Ending(committed, resync=not committed and (done or not agrees), keep=keep, give_back=give_back)


MAX_REDUCERS = 64  # reducer nodes one group may name (the coordinator's word, bounded all the same)


def refuse_reducers(group: pb.AveragingGroup, coordinator_peer_id: str) -> str:
    """Why we would not send to the reducers this group names (the coordinator's word over its pinned
    TLS channel: its own peer, given at join, or the operator's reducer nodes); "" if we would."""
    if not group.reducers:
        return ("" if group.reducer_peer_id == coordinator_peer_id else
                "the coordinator named another reducer than the hivemind peer it gave us at join")
    peers = [n.peer_id for n in group.reducers]
    if len(peers) > MAX_REDUCERS or len(set(peers)) != len(peers):
        return f"the group names {len(peers)} reducer nodes ({len(set(peers))} distinct; at most {MAX_REDUCERS})"
    try:
        for p in peers:
            PeerID.from_base58(p)
    except Exception:
        return "the group names a reducer node whose peer id does not parse"
    return ""


class Exchanger:
    """Starts the exchanges of a worker's rounds. cfg: the coordinator's RunConfig; feedback: a
    top-k run's error feedback (None otherwise); stopping: set when the worker stops; records: where
    the worker's sealed records of its rounds are (rounds/replay.py; None: it keeps none).

    begin() and end() run on the round loop (feedback is theirs alone); the exchange begin() starts
    runs on its own thread and touches the client, the contributor, the OuterState handed to it, and
    the shared state under its lock; it starts the upload of a record (a Task of its own, which reads
    a sealed record file the round loop no longer writes)."""

    def __init__(self, *, client: CoordinatorClient, shared: SharedState, contributor: RoundContributor,
                 cfg: pb.RunConfig, feedback: ErrorFeedback | None, stopping: threading.Event,
                 records: Path | None = None) -> None:
        self.client, self.shared, self.contributor, self.cfg = client, shared, contributor, cfg
        self.feedback, self.stopping, self.records = feedback, stopping, records

    def begin(self, r: int, outer: OuterState, *, local: Grads, contribution: Contribution,
              seal: Callable[[Grads | None], str] | None = None) -> Exchange | None:
        """Round r is averaging: take our pseudo-gradient from theta_local (local), seal our record of
        the round (seal(top-k residual) -> its sha256, rounds/replay.py), take our place in its group
        with our final claims and that commitment, and start the exchange, which owns `outer` from now
        on; None (outer stays ours) if we stop or the round moved on without us."""
        s = self.shared
        s.set(WorkerState.AVERAGING, f"averaging round {r} with the swarm")
        sent = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in local.items()}
        grad = pseudo_gradient(outer.theta, sent)
        residual = dict(self.feedback.residual) if self.feedback is not None else None
        if self.feedback is not None:  # top-k: the largest values of it and of what we left out before
            grad = self.feedback.sparsify(grad)
        commit = seal(residual) if seal is not None else ""
        group = self.group(r, commit)
        if group is None:
            return None
        if group.state != Place.MEMBER:
            log.warning("round %d: %s", r, group.detail)
            outcome = Outcome(False, error=group.detail)
            return Exchange(r, group, None, lambda: self._settle(r, outcome, outer, None))
        grad, weight = contribution(grad, group.weight, r)
        if not all(torch.isfinite(g).all() for g in grad.values()):
            log.warning("round %d: our pseudo-gradient is not finite; the swarm will reject it", r)
        with s.lock:
            s.ahead = True  # from now on, what we train is the next round's
        return Exchange(r, group, sent, lambda: self._exchange(r, group, grad, weight, outer))

    def end(self, ex: Exchange, *, finishing: bool) -> tuple[Settled, Ending | None]:
        """Once ex is done: what it handed back, and what the round loop does with it (None: we stop).
        A round that took our top-k contribution makes what we left out of it the new residual."""
        settled = ex.get()
        result = settled.result
        if result is None:
            return settled, None
        if not settled.outcome.ok:
            log.warning("round %d: %s", ex.round, settled.outcome.error)
        if self.feedback is not None and result.included and result.state == RoundState.DONE:
            self.feedback.commit()
        return settled, ending(ex.round, settled.outcome, result, agrees=settled.agrees,
                               ahead_seconds=ex.ahead_seconds, finishing=finishing)

    def group(self, r: int, commit: str = "") -> pb.AveragingGroup | None:
        """Our place in round r's averaging group, as the coordinator decided it; None if we stop or
        the round is over."""
        while not self.stopping.is_set():
            group = self.client.averaging_group(r, self.shared.claims(), commit)  # our final claims: our weight
            if group.state == Place.OVER:
                return None
            if group.state == Place.MEMBER:
                why = refuse_reducers(group, self.cfg.coordinator_peer_id)
                if why:
                    group.state, group.detail = Place.NOT_MEMBER, why + "; not sending"
            if group.state != Place.WAIT:
                return group
            self.stopping.wait(group.retry_after or 0.2)
        return None

    def _exchange(self, r: int, group: pb.AveragingGroup, grad: Grads, weight: float, outer: OuterState) -> Settled:
        """On the exchange's thread: contribute, take the outer step, settle."""
        reducers = ([(n.peer_id, list(n.maddrs)) for n in group.reducers] if group.reducers
                    else [(self.cfg.coordinator_peer_id, list(group.reducer_maddrs))])
        outcome = self.contributor.contribute(
            grad, group_id=group.group_id, reducers=reducers, reducer_nodes=bool(group.reducers), weight=weight,
            timeout=self.cfg.averaging_timeout,
            give_up=self.stopping.is_set)  # not when the round moves on: on a slow link our average may
        # still be arriving after the coordinator committed; a reducer that left us out closes our stream
        self.shared.sent(outcome.bytes_sent)
        if self.stopping.is_set():
            return Settled(outcome, None, outer, False)
        before = None
        if outcome.ok:  # kept until the coordinator says whether the round committed
            before = outer.copy()
            outer_step(outer.theta, outer.momentum, outcome.averaged, self.cfg.outer_lr, self.cfg.outer_momentum)
        return self._settle(r, outcome, outer, before)

    def _settle(self, r: int, outcome: Outcome, outer: OuterState, before: OuterState | None) -> Settled:
        """On the exchange's thread, once our part is done: the coordinator's result of round r and
        whether our theta_global agrees with it. A round that did not commit puts theta_global back
        (before: as it was before the outer step); one that included us gets the shards we finished
        in it reported."""
        s = self.shared
        result = self._result(r)
        if self.stopping.is_set():
            return Settled(outcome, None, outer, False)
        if before is not None and result.state != RoundState.DONE:  # failed, or its theta was rejected
            outer = before
            log.warning("round %d %s: %s", r, result.state, result.detail)
        if result.replay and result.included:
            Task(lambda: self._upload(r), "replay-upload")  # a daemon: the training goes on meanwhile
        if result.included:
            with s.lock:
                completed = list(s.completed)
            for lease_id, _, loss in completed:
                self.client.report(lease_id, round_=r, loss=loss or 0.0)
            with s.lock:
                s.completed = []
        return Settled(outcome, result, outer, outer.hash() == result.theta_hash)

    def _upload(self, r: int) -> None:
        """On a thread of its own: our record of round r, which the coordinator drew for a replay (no
        record: an empty upload says so, and the round's credit goes)."""
        path = record_path(self.records, r) if self.records is not None else None
        try:
            blob = path.read_bytes() if path is not None else b""
        except OSError:
            blob = b""
        try:
            receipt = self.client.upload_replay(r, blob)
        except Exception as e:  # noqa: BLE001 (the coordinator's deadline decides; we go on training)
            log.warning("round %d: could not upload our record for its replay: %s", r, e)
            return
        if receipt.accepted:
            log.info("round %d: the coordinator replays it; our record (%d bytes) is uploaded", r, len(blob))
        else:
            log.warning("round %d: our record for its replay was refused: %s", r, receipt.detail)

    def _result(self, r: int) -> pb.RoundResult:
        while True:
            res = self.client.round_result(r)
            if res.state in (RoundState.DONE, RoundState.FAILED, RoundState.REJECTED) or self.stopping.is_set():
                return res
            self.stopping.wait(RESULT_POLL)

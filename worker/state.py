"""What the worker's threads share, behind one lock: the round loop writes its progress here, the
heartbeat thread reads it (and writes what the coordinator answered), the prefetch thread puts the
shard it leased ahead, the exchange thread adds the bytes it sent and clears the shards it
reported, the control socket reads it."""

import threading
import time
from dataclasses import dataclass, field

from gptswarm.mingpt_core.data import Batches
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.states import WorkerState


@dataclass
class LeasedShard:
    """A shard leased from the coordinator and the training done on it. lease_id, tokens, batches
    and steps_needed never change; steps_done, counted and loss change under SharedState's lock
    (stepped()); batches is read by the round loop alone."""
    lease_id: str
    tokens: int
    batches: Batches  # over this shard alone
    steps_needed: int
    steps_done: int = 0
    counted: int = 0  # of its tokens, how many this worker counted as trained (in its round tokens)
    loss: float | None = None


@dataclass(frozen=True)
class Claims:
    """A round's finished leases and its claims (lease_id -> tokens), read in one critical section."""
    round: int
    finished_lease_ids: tuple[str, ...]
    tokens: dict[str, int] = field(default_factory=dict)


class SharedState:
    """Every read and write of a field holds `lock`: a named method below, or `with shared.lock:`
    around several fields read or written together. Who writes what: the round loop its round
    (state, round, tokens, shards, completed, ahead ...); the heartbeat thread view, heard_at and
    lost (heard()); the prefetch thread next_shard and unannounced (announced()); the exchange
    thread bytes_sent (sent()) and completed (emptied once reported); the control thread nothing."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state, self.reason = WorkerState.JOINING, ""
        self.round = 0
        self.round_tokens = 0  # tokens trained in self.round so far
        self.round_leases: dict[str, int] = {}  # lease_id -> tokens trained on it in self.round (credited)
        self.tokens_contributed = 0  # tokens of ours that rounds included
        self.tokens_per_second = 0.0  # moving average over training steps
        self.bytes_sent = 0  # sent for averaging so far
        self.losses: list[float] = []  # the last training losses
        self.shard: LeasedShard | None = None  # the one in training
        self.next_shard: LeasedShard | None = None  # the one leased ahead, while the last steps of that one ran
        self.completed: list[tuple[str, int, float | None]] = []  # (lease_id, tokens, loss) trained in this
        # round, reported after its average
        self.unannounced: list[str] = []  # ids of completed leases the coordinator has not been told of yet
        self.view: pb.HeartbeatResponse | None = None  # the coordinator's last answer to a heartbeat
        self.heard_at = 0.0  # when it came (time.monotonic())
        self.lost: set[str] = set()  # lease ids the coordinator no longer holds for us
        # training ahead: while our round's average is in flight we train for the next round
        self.ahead = False
        self.ahead_tokens = 0
        self.ahead_leases: dict[str, int] = {}
        self.ahead_completed: list[tuple[str, int, float | None]] = []

    def set(self, state: WorkerState, reason: str = "") -> None:
        with self.lock:
            self.state, self.reason = state, reason

    def get(self) -> tuple[WorkerState, str]:
        with self.lock:
            return self.state, self.reason

    def lease_ids(self) -> list[str]:
        with self.lock:
            return self.lease_ids_locked()

    def lease_ids_locked(self) -> list[str]:
        """Every lease we hold (under the lock)."""
        ids = [c[0] for c in self.completed + self.ahead_completed]
        return ids + [sh.lease_id for sh in (self.shard, self.next_shard) if sh is not None]

    def stepped(self, shard: LeasedShard, batch_tokens: int, loss: float, seconds: float) -> None:
        """One training step on `shard` (the one in training), counted and, if it was its last,
        the shard finished, in one critical section."""
        with self.lock:
            shard.steps_done += 1
            shard.loss = loss
            tokens = min(batch_tokens, shard.tokens - shard.counted)  # the last batch may reach past its tokens
            shard.counted += tokens
            self._trained(shard.lease_id, tokens, batch_tokens, loss, seconds)
            if shard.steps_done >= shard.steps_needed:
                self._finished(shard.lease_id, shard.tokens, loss)

    def _trained(self, lease_id: str, tokens: int, batch_tokens: int, loss: float, seconds: float) -> None:
        if self.ahead:
            self.ahead_tokens += tokens
            self.ahead_leases[lease_id] = self.ahead_leases.get(lease_id, 0) + tokens
        else:
            self.round_tokens += tokens
            self.round_leases[lease_id] = self.round_leases.get(lease_id, 0) + tokens
        self.losses = (self.losses + [loss])[-50:]
        tps = batch_tokens / seconds
        self.tokens_per_second = 0.9 * self.tokens_per_second + 0.1 * tps if self.tokens_per_second else tps

    def _finished(self, lease_id: str, tokens: int, loss: float | None) -> None:
        if self.ahead:
            self.ahead_completed.append((lease_id, tokens, loss))
        else:
            self.completed.append((lease_id, tokens, loss))
            self.unannounced.append(lease_id)
        self.shard = None

    def lease_claims(self) -> Claims:
        """What a LeaseRequest for our round says: the shards we finished in it and our claims on its
        leases, read in one critical section (a round that changed between them made the coordinator
        refuse a finished shard whose claims were not in the same request)."""
        with self.lock:
            return Claims(self.round, tuple(self.unannounced), dict(self.round_leases))

    def announced(self, lease_ids: tuple[str, ...] | list[str]) -> None:
        """The coordinator was told these leases are finished."""
        with self.lock:
            self.unannounced = [i for i in self.unannounced if i not in lease_ids]

    def claims(self) -> dict[str, int]:
        """The round's claims (lease_id -> tokens), as the coordinator takes them (not what was trained
        ahead for the next round: that is claimed once the next round is open)."""
        with self.lock:
            return dict(self.round_leases)

    def heard(self, view: pb.HeartbeatResponse) -> None:
        """The coordinator answered a heartbeat."""
        with self.lock:
            self.view, self.heard_at = view, time.monotonic()
            self.lost.update(view.expired_lease_ids)

    def sent(self, nbytes: int) -> None:
        """An exchange sent nbytes for averaging."""
        with self.lock:
            self.bytes_sent += nbytes

    def sent_total(self) -> int:
        with self.lock:
            return self.bytes_sent

    def take_shards(self) -> list[str]:
        """Let go of the shard in training and the one leased ahead: their lease ids (to give back)."""
        with self.lock:
            ids = [sh.lease_id for sh in (self.shard, self.next_shard) if sh is not None]
            self.shard = self.next_shard = None
            return ids

    def forget_leases(self) -> None:
        """Every lease of ours was given back (the round did not include us, or we missed it)."""
        with self.lock:
            self.completed, self.shard, self.next_shard = [], None, None

    def next_round(self, round_: int, contributed: int = 0, keep_ahead: bool = True) -> None:
        """This round is over for us: the next one starts with what we trained ahead for it (or
        nothing: keep_ahead False drops it)."""
        with self.lock:
            self.tokens_contributed += contributed
            if keep_ahead:
                self.round_tokens, self.round_leases, self.completed = (self.ahead_tokens, self.ahead_leases,
                                                                        self.ahead_completed)
            else:
                self.round_tokens, self.round_leases, self.completed = 0, {}, []
            self.round, self.unannounced = round_, [c[0] for c in self.completed]
            self.ahead, self.ahead_tokens, self.ahead_leases, self.ahead_completed = False, 0, {}, []

"""What the worker's three threads share: the round loop writes its progress here, the heartbeat
thread reads it (and writes what the coordinator answered), the control socket reads it. Every
read and write goes through the lock."""

import threading
import time
from dataclasses import dataclass

from gptswarm.proto import gptswarm_pb2 as pb


@dataclass
class LeasedShard:
    """A shard leased from the coordinator and the training done on it."""
    lease_id: str
    tokens: int
    batches: object  # mingpt_core.data.Batches over this shard alone
    steps_needed: int
    steps_done: int = 0
    counted: int = 0  # of its tokens, how many this worker counted as trained (in its round tokens)
    loss: float = None


class SharedState:
    def __init__(self):
        self.lock = threading.Lock()
        self.state, self.reason = "joining", ""
        self.round = 0
        self.round_tokens = 0  # tokens trained in self.round so far
        self.round_leases = {}  # lease_id -> tokens trained on it in self.round (what the coordinator credits)
        self.tokens_contributed = 0  # tokens of ours that rounds included
        self.tokens_per_second = 0.0  # moving average over training steps
        self.losses = []  # the last training losses
        self.shard = None  # the LeasedShard in training
        self.next_shard = None  # the one leased ahead, while the last steps of that one ran
        self.completed = []  # (lease_id, tokens, loss) trained in this round, reported after its average
        self.unannounced = []  # ids of completed leases the coordinator has not been told of yet
        self.view = None  # the coordinator's last HeartbeatResponse
        self.heard_at = 0.0  # when it came (time.monotonic())
        self.lost = set()  # lease ids the coordinator no longer holds for us
        # training ahead: while our round's average is in flight we train for the next round
        self.ahead = False
        self.ahead_tokens, self.ahead_leases, self.ahead_completed = 0, {}, []

    def set(self, state, reason=""):
        with self.lock:
            self.state, self.reason = state, reason

    def get(self):
        with self.lock:
            return self.state, self.reason

    def lease_ids(self):
        with self.lock:
            return self.lease_ids_locked()

    def lease_ids_locked(self):
        """Every lease we hold (under the lock)."""
        ids = [c[0] for c in self.completed + self.ahead_completed]
        return ids + [sh.lease_id for sh in (self.shard, self.next_shard) if sh is not None]

    def trained(self, lease_id, tokens, batch_tokens, loss, seconds):
        """One training step on lease_id of batch_tokens in `seconds`, of which `tokens` count."""
        with self.lock:
            if self.ahead:
                self.ahead_tokens += tokens
                self.ahead_leases[lease_id] = self.ahead_leases.get(lease_id, 0) + tokens
            else:
                self.round_tokens += tokens
                self.round_leases[lease_id] = self.round_leases.get(lease_id, 0) + tokens
            self.losses = (self.losses + [loss])[-50:]
            tps = batch_tokens / seconds
            self.tokens_per_second = 0.9 * self.tokens_per_second + 0.1 * tps if self.tokens_per_second else tps

    def finished_shard(self, lease_id, tokens, loss):
        """The shard in training is done: reported after its round's average (the next round's, if
        it was finished while training ahead)."""
        with self.lock:
            if self.ahead:
                self.ahead_completed.append((lease_id, tokens, loss))
            else:
                self.completed.append((lease_id, tokens, loss))
                self.unannounced.append(lease_id)
            self.shard = None

    def lease_request(self):
        """A LeaseRequest for our round: the shards we finished in it and our claims on its leases,
        read in one critical section (a round that changed between them made the coordinator refuse
        a finished shard whose claims were not in the same request)."""
        with self.lock:
            req = pb.LeaseRequest(round=self.round, finished_lease_ids=self.unannounced)
            req.lease_tokens.extend(pb.LeaseTokens(lease_id=k, tokens=v) for k, v in self.round_leases.items())
            return req

    def announced(self, lease_ids):
        """The coordinator was told these leases are finished."""
        with self.lock:
            self.unannounced = [i for i in self.unannounced if i not in lease_ids]

    def lease_tokens(self):
        """The round's claims, as the coordinator takes them: [LeaseTokens] (not what was trained
        ahead for the next round: that is claimed once the next round is open)."""
        with self.lock:
            return [pb.LeaseTokens(lease_id=k, tokens=v) for k, v in self.round_leases.items()]

    def heard(self, view):
        """The coordinator answered a heartbeat."""
        with self.lock:
            self.view, self.heard_at = view, time.monotonic()
            self.lost.update(view.expired_lease_ids)

    def next_round(self, round_, contributed=0, keep_ahead=True):
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

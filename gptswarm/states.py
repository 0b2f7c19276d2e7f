"""The states and phases both sides name, in one place.

They are `StrEnum`s: a member is the very string the ledger stores in its columns, the wire
carries (HeartbeatRequest.state, HeartbeatResponse.phase, RoundResultResponse.state) and the
status page shows, so a value read from SQLite or from the network compares equal to its member.
Nothing outside this file and the ledger's schema spells one of these states as a literal.
"""

from enum import StrEnum


class Phase(StrEnum):
    """The coordinator's current round: workers train, or the round is being averaged."""
    TRAINING = "training"
    AVERAGING = "averaging"


class Place(StrEnum):
    """A worker's place in a round's averaging (GetAveragingGroup's answer, AveragingGroup.state)."""
    MEMBER = "member"  # send your contribution to the reducer, with this weight
    WAIT = "wait"  # the round is not averaging yet: ask again in retry_after seconds
    OVER = "over"  # the round has ended
    NOT_MEMBER = "not_member"  # not in its group (detail says why)


class RoundState(StrEnum):
    """A round in the ledger (and in GetRoundResult's answer)."""
    TRAINING = "training"
    AVERAGING = "averaging"
    DONE = "done"  # committed: its average is the next round's theta
    FAILED = "failed"  # averaging failed: theta unchanged, nobody credited
    REJECTED = "rejected"  # committed, then undone by the evaluation gate


class LeaseState(StrEnum):
    """A lease on one shard."""
    ACTIVE = "active"  # its worker trains it
    TRAINED = "trained"  # its worker finished it; not yet wholly credited
    DONE = "done"  # its tokens are all credited
    EXPIRED = "expired"  # its deadline passed: the shard went back to the queue
    RELEASED = "released"  # its worker gave it back


OPEN_LEASES = (LeaseState.ACTIVE, LeaseState.TRAINED)  # lease states that hold a shard


class ShardState(StrEnum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"


class WorkerState(StrEnum):
    """What a worker says it is doing (its heartbeat: the first seven), and how the ledger and the
    status page show one that says nothing (offline: left, or no recent heartbeat) or is shut out."""
    JOINING = "joining"
    SYNCING = "syncing"
    TRAINING = "training"
    AVERAGING = "averaging"
    WAITING = "waiting"
    PAUSED = "paused"
    FINISHING = "finishing"
    OFFLINE = "offline"
    QUARANTINED = "quarantined"


REPORTED_STATES = tuple(WorkerState)[:7]  # the states a worker's heartbeat may say


class ReducerState(StrEnum):
    """One of the operator's reducer nodes, as the status page shows it: heard from lately (live), or not."""
    LIVE = "live"
    OFFLINE = WorkerState.OFFLINE.value


class ReplayState(StrEnum):
    """A contribution drawn for a replay (rounds/replay.py, coordinator/replays.py)."""
    REQUESTED = "requested"  # its worker is asked for its record of the round
    UPLOADED = "uploaded"  # the record is here, the one committed to: its replay waits or runs
    PASSED = "passed"  # the record makes what was sent: the round's credit is verified
    FAILED = RoundState.FAILED.value  # it does not, or the record is not the one committed to: its unverified
    #                                   credit taken back, quarantined
    UNANSWERED = "unanswered"  # no record by the deadline: the round's credit taken back
    LOST = "lost"  # the coordinator's side failed (or restarted): nothing changes


OPEN_REPLAYS = (ReplayState.REQUESTED, ReplayState.UPLOADED)

"""The coordinator's ledger: one SQLite database (WAL) in the state directory, and the only code
that knows its schema; everything else asks it named questions.

Tables: workers, shards, leases, rounds, contributions, replays, refusals, events, reducers, meta. Every change is one
transaction, so a coordinator killed at any moment restarts with a consistent ledger.

Its parts, each building on those before it: schema.py (the tables), store.py (the connection, its
lock, `tx` and `query`, the meta counters), events.py (events and refusals), views.py (read-only
questions, and LedgerView to ask them without a coordinator), leases.py (shards, leases, claims),
workers.py (sessions, peers, quarantine), rounds.py (a round's start, commit, failure, rollback),
reducers.py (the operator's reducer nodes' credentials), replays.py (replays and what they verified).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from gptswarm.states import OPEN_LEASES

from .events import EVENT_EVERY, MAX_SOURCES, STRANGERS, EventLog
from .leases import LeaseBook
from .reducers import ReducerBook
from .replays import ReplayBook
from .rounds import RoundBook
from .schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION
from .store import Store
from .views import ONLINE_HEARTBEATS, ONLINE_SLACK, LedgerView, Views
from .workers import WorkerBook, digest

OPEN = OPEN_LEASES  # lease states that hold a shard

__all__ = ["EVENT_EVERY", "MAX_SOURCES", "MIGRATIONS", "ONLINE_HEARTBEATS", "ONLINE_SLACK", "OPEN", "SCHEMA",
           "SCHEMA_VERSION", "STRANGERS", "Ledger", "LedgerView", "digest"]


class Ledger(ReplayBook, ReducerBook, RoundBook, WorkerBook, LeaseBook, EventLog, Views, Store):
    """lease_seconds: how long a lease lives without a heartbeat; heartbeat_interval: how often
    workers beat (it defines who is online); max_leases: active leases a worker may hold at once;
    max_tokens_per_second: the fastest a worker could possibly train (claims beyond are clamped);
    quarantine_after, quarantine_window: a worker whose contribution was flagged in this many of
    the last quarantine_window rounds it took part in is quarantined; clock: time source (tests pass
    a fake one)."""

    def __init__(self, path: str | os.PathLike[str], *, lease_seconds: float, heartbeat_interval: float,
                 max_leases: int = 2, max_tokens_per_second: float = float("inf"), quarantine_after: int = 2,
                 quarantine_window: int = 5, clock: Callable[[], float] = time.time) -> None:
        self.lease_seconds = lease_seconds
        self.heartbeat_interval = heartbeat_interval
        self.max_leases = max_leases
        self.quarantine_after, self.quarantine_window = quarantine_after, quarantine_window
        self.max_tokens_per_second = max_tokens_per_second
        self._last_event = {}
        super().__init__(path, clock=clock)

"""Workers: who joined, their sessions and secrets (only digests are kept), their hivemind peer ids,
who is online, and quarantine (a worker whose contributions were flagged too often)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3

from gptswarm.states import RoundState, WorkerState

from .leases import LeaseBook
from .store import Row
from .views import Views


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class WorkerBook(LeaseBook, Views):
    quarantine_after: int  # a worker whose contribution was flagged in this many ...
    quarantine_window: int  # ... of the last this many rounds it took part in is quarantined

    def add_worker(self, *, name: str, device: str, peer_id: str, current_round: int,
                   round_started: bool) -> tuple[str, str, str]:
        """A new worker: (worker id, session, worker secret). The session authenticates its calls
        until it expires or is revoked; the secret lets it come back as the same worker in a later
        Join (resume_worker). Only their digests are kept. It may train in the current round only
        if that round has not started yet (no tokens trained in it); otherwise from the next one.
        peer_id must be free (see register_peer)."""
        worker_id = "w-" + secrets.token_hex(6)
        session, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        now = self.clock()
        eligible = current_round + 1 if round_started else current_round
        with self.tx() as db:
            db.execute("INSERT INTO workers (id, name, device, peer_id, client_mode, session_hash, joined_at, "
                       "last_seen, state, reason, eligible_round, active_since, secret_hash) "
                       "VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, '', ?, ?, ?)",
                       (worker_id, name, device, peer_id, digest(session), now, now, WorkerState.JOINING, eligible,
                        now, digest(secret)))
            self.event("join", f"{name} ({device})", worker_id, db)
        return worker_id, session, secret

    def resume_worker(self, worker_id: str, secret: str, *, peer_id: str, current_round: int,
                      round_started: bool) -> str | None:
        """A new session for a worker this ledger knows, if secret is its own; else None. Like a
        new worker, it waits for the next round if this one is under way; peer_id must be free."""
        row = self.worker(worker_id)
        if row is None or not row["secret_hash"] or not hmac.compare_digest(row["secret_hash"], digest(secret)):
            return None
        session = secrets.token_urlsafe(24)
        now = self.clock()
        with self.tx() as db:
            db.execute("UPDATE workers SET session_hash = ?, peer_id = ?, left_at = NULL, state = ?, "
                       "reason = '', last_seen = ?, eligible_round = ?, active_since = ? WHERE id = ?",
                       (digest(session), peer_id, WorkerState.JOINING, now,
                        current_round + 1 if round_started else current_round, now, worker_id))
            self.event("rejoin", "back with its worker secret", worker_id, db)
        return session

    def peer_owner(self, peer_id: str) -> str | None:
        """The id of the worker still in the swarm that registered this hivemind peer id, or None."""
        rows = self.query("SELECT id FROM workers WHERE peer_id = ? AND left_at IS NULL", (peer_id,))
        return rows[0]["id"] if rows else None

    def register_peer(self, worker_id: str, peer_id: str) -> tuple[bool, str]:
        """Tie a worker to the hivemind peer id that will send its contributions. (ok, detail)."""
        with self.tx() as db:
            taken = db.execute("SELECT id FROM workers WHERE peer_id = ? AND id != ? AND left_at IS NULL",
                               (peer_id, worker_id)).fetchone()
            if taken is not None:
                self.refuse("peer_id_taken", f"tried to register peer id {peer_id[:60]}, which another worker holds",
                            worker_id, db)
                return False, "that hivemind peer id is registered by another worker"
            db.execute("UPDATE workers SET peer_id = ? WHERE id = ?", (peer_id, worker_id))
            return True, ""

    def worker_for_session(self, session: str, ttl: float = float("inf")) -> Row | None:
        """The worker whose session this is, or None; a session its worker has not used for ttl
        seconds is revoked here (the worker joins again with its secret)."""
        rows = self.query("SELECT * FROM workers WHERE session_hash = ?", (digest(session),))
        if not rows:
            return None
        if self.clock() - (rows[0]["last_seen"] or 0) > ttl:
            with self.tx() as db:
                db.execute("UPDATE workers SET session_hash = NULL WHERE id = ?", (rows[0]["id"],))
                self.event("session_expired", f"unused for over {ttl:.0f} s", rows[0]["id"], db)
            return None
        return rows[0]

    def revoke_sessions(self, why: str) -> int:
        """End every session (token rotation): workers must join again, with the new token."""
        with self.tx() as db:
            n: int = db.execute("UPDATE workers SET session_hash = NULL WHERE session_hash IS NOT NULL").rowcount
            self.event("sessions_revoked", f"{n} session(s): {why}", None, db)
        return n

    def worker(self, worker_id: str) -> Row | None:
        rows = self.query("SELECT * FROM workers WHERE id = ?", (worker_id,))
        return rows[0] if rows else None

    def come_back(self, worker_id: str, *, current_round: int, round_started: bool) -> None:
        """A worker that left (or crashed) is back with its session: same identity, same totals;
        like a new worker, it waits for the next round if this one is under way."""
        now = self.clock()
        with self.tx() as db:
            db.execute("UPDATE workers SET left_at = NULL, state = ?, reason = '', last_seen = ?, "
                       "eligible_round = ?, active_since = ? WHERE id = ?",
                       (WorkerState.JOINING, now, current_round + 1 if round_started else current_round, now,
                        worker_id))
            self.event("rejoin", "back with its session", worker_id, db)

    def leave(self, worker_id: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE workers SET left_at = ?, state = ?, reason = 'left', session_hash = NULL "
                       "WHERE id = ?", (self.clock(), WorkerState.OFFLINE, worker_id))
            n = self._release(db, worker_id, None)
            # what it trained in the round under way leaves with it: its pseudo-gradient is gone
            db.execute("DELETE FROM contributions WHERE worker_id = ? AND included IS NULL AND round IN "
                       "(SELECT round FROM rounds WHERE state = ?)", (worker_id, RoundState.TRAINING))
            self.event("leave", f"returned {n} lease(s)", worker_id, db)

    # --- quarantine ---

    def quarantine_reason(self, worker_id: str) -> str | None:
        """Why the worker is quarantined, or None."""
        rows = self.query("SELECT quarantine_reason FROM workers WHERE id = ? AND quarantined_at IS NOT NULL",
                          (worker_id,))
        return rows[0]["quarantine_reason"] if rows else None

    def lift_quarantine(self, worker_id: str) -> bool:
        """The operator lets a quarantined worker back in (its past flags are forgiven). False if it
        was not quarantined."""
        with self.tx() as db:
            if not db.execute("UPDATE workers SET quarantined_at = NULL, quarantine_reason = NULL WHERE id = ? "
                              "AND quarantined_at IS NOT NULL", (worker_id,)).rowcount:
                return False
            db.execute("UPDATE contributions SET flagged = 0 WHERE worker_id = ?", (worker_id,))
            self.event("quarantine_lifted", "by the operator", worker_id, db)
            return True

    def _quarantine_if_repeated(self, db: sqlite3.Connection, worker_id: str) -> None:
        flags = [r[0] for r in db.execute("SELECT flagged FROM contributions WHERE worker_id = ? AND included IS NOT NULL "
                                          "ORDER BY round DESC LIMIT ?", (worker_id, self.quarantine_window))]
        if sum(flags) >= self.quarantine_after:
            reason = (f"contribution flagged in {sum(flags)} of its last {len(flags)} rounds "
                      f"(at most {self.quarantine_after - 1} allowed)")
            if db.execute("UPDATE workers SET quarantined_at = ?, quarantine_reason = ? WHERE id = ? "
                          "AND quarantined_at IS NULL", (self.clock(), reason, worker_id)).rowcount:
                self._release(db, worker_id, None)
                self.event("quarantined", reason, worker_id, db)

    # --- who is online (online_after, in views.py, defines it) ---

    def online_count(self) -> int:
        return self.query("SELECT COUNT(*) AS n FROM workers WHERE left_at IS NULL AND last_seen > ?",
                          (self.online_after(),))[0]["n"]

    def swarm_tokens_per_second(self) -> float:
        """Sum of the online, training workers' throughput."""
        return self.query("SELECT COALESCE(SUM(tokens_per_second), 0) AS n FROM workers WHERE left_at IS NULL "
                          "AND last_seen > ? AND state = ?", (self.online_after(), WorkerState.TRAINING))[0]["n"]

    def anyone_may_train(self, round_: int) -> bool:
        """Is an online worker allowed to train in round round_ (not one that waits for the next)?"""
        return bool(self.query("SELECT 1 FROM workers WHERE left_at IS NULL AND quarantined_at IS NULL "
                               "AND last_seen > ? AND eligible_round <= ? LIMIT 1", (self.online_after(), round_)))

    def anyone_training(self) -> bool:
        """Is an online worker training right now?"""
        return bool(self.query("SELECT 1 FROM workers WHERE state = ? AND last_seen > ? AND left_at IS NULL "
                               "LIMIT 1", (WorkerState.TRAINING, self.online_after())))

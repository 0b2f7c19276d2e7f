"""Replays (coordinator/replays.py): the contributions drawn for one, the commitment each worker
made to its record, and what the replay found. A replay that passed makes the round's credit
verified; one that failed (the record is not what was committed to, does not account for the
claims, or does not make what was sent) takes back every credit of the worker's that no replay
verified and quarantines it; one never answered (the worker left, had no record, missed the
deadline) takes back that round's credit."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from gptswarm.states import OPEN_REPLAYS, ReplayState

from .store import Row
from .workers import WorkerBook

ENDS = (ReplayState.PASSED, ReplayState.FAILED, ReplayState.UNANSWERED, ReplayState.LOST)


class ReplayBook(WorkerBook):
    def request_replays(self, round_: int, commits: Mapping[str, str], deadline: float) -> None:
        """Ask these workers ({worker id: the sha256 they committed to}) for their records of round_."""
        now = self.clock()
        with self.tx() as db:
            db.executemany("INSERT OR IGNORE INTO replays (round, worker_id, commit_hash, state, requested_at, "
                           "deadline) VALUES (?, ?, ?, 'requested', ?, ?)",
                           [(round_, w, c, now, now + deadline) for w, c in commits.items()])

    def replay_row(self, round_: int, worker_id: str) -> Row | None:
        rows = self.query("SELECT * FROM replays WHERE round = ? AND worker_id = ?", (round_, worker_id))
        return rows[0] if rows else None

    def replay_requested(self, round_: int, worker_id: str) -> bool:
        row = self.replay_row(round_, worker_id)
        return row is not None and row["state"] == "requested"

    def replays_waiting(self, worker_id: str) -> bool:
        """Does any replay wait for this worker's record?"""
        return bool(self.query("SELECT 1 FROM replays WHERE worker_id = ? AND state = 'requested' LIMIT 1",
                               (worker_id,)))

    def replay_uploaded(self, round_: int, worker_id: str) -> bool:
        """The record arrived (requested -> uploaded); False if the replay was not waiting for it."""
        with self.tx() as db:
            return bool(db.execute("UPDATE replays SET state = 'uploaded' WHERE round = ? AND worker_id = ? "
                                   "AND state = 'requested'", (round_, worker_id)).rowcount)

    def overdue_replays(self) -> list[Row]:
        """Requested replays whose deadline has passed without a record."""
        return self.query("SELECT round, worker_id FROM replays WHERE state = 'requested' AND deadline < ?",
                          (self.clock(),))

    def lose_open_replays(self, why: str) -> int:
        """Replays that cannot go on (the coordinator restarted: their rounds' theta and samples are
        gone): nobody's fault, nothing taken back."""
        with self.tx() as db:
            n = db.execute("UPDATE replays SET state = 'lost', ended_at = ?, detail = ? WHERE state IN (?, ?)",
                           (self.clock(), why, *OPEN_REPLAYS)).rowcount
        if n:
            self.event("replays_lost", f"{n} replay(s): {why}")
        return n

    def end_replay(self, round_: int, worker_id: str, state: str, detail: str, *, distance: float | None = None,
                   seconds: float | None = None) -> None:
        """A replay's end (ENDS), with its consequences on the worker's credit, in one transaction."""
        assert state in ENDS
        with self.tx() as db:
            if not db.execute("UPDATE replays SET state = ?, ended_at = ?, detail = ?, distance = ?, seconds = ? "
                              "WHERE round = ? AND worker_id = ? AND state IN (?, ?)",
                              (state, self.clock(), detail[:500], distance, seconds, round_, worker_id,
                               *OPEN_REPLAYS)).rowcount:
                return
            if state == "passed":
                row = db.execute("SELECT credited FROM contributions WHERE round = ? AND worker_id = ?",
                                 (round_, worker_id)).fetchone()
                credited = (row["credited"] or 0) if row else 0
                db.execute("UPDATE contributions SET verified = ? WHERE round = ? AND worker_id = ?",
                           (credited, round_, worker_id))
                db.execute("UPDATE workers SET tokens_verified = tokens_verified + ? WHERE id = ?",
                           (credited, worker_id))
                self.event("replay_passed", f"round {round_}: {credited} tokens verified; {detail}", worker_id, db)
            elif state == "failed":
                taken = self._take_back(db, worker_id, None)
                reason = f"a replay of round {round_} failed: {detail}"
                if db.execute("UPDATE workers SET quarantined_at = ?, quarantine_reason = ? WHERE id = ? "
                              "AND quarantined_at IS NULL", (self.clock(), reason[:500], worker_id)).rowcount:
                    self._release(db, worker_id, None)
                    self.event("quarantined", reason, worker_id, db)
                self.event("replay_failed", f"round {round_}: {detail}; {taken} unverified tokens of credit taken "
                                            "back", worker_id, db)
            elif state == "unanswered":
                taken = self._take_back(db, worker_id, round_)
                self.event("replay_unanswered", f"round {round_}: {detail}; its {taken} tokens of credit taken back",
                           worker_id, db)
            else:
                self.event("replay_lost", f"round {round_}: {detail}", worker_id, db)

    def _take_back(self, db: sqlite3.Connection, worker_id: str, round_: int | None) -> int:
        """The worker's credit that no replay verified (of round_ alone, if given) goes: its total."""
        where = "worker_id = ? AND credited > 0 AND verified IS NULL" + (" AND round = ?" if round_ is not None else "")
        args = (worker_id,) if round_ is None else (worker_id, round_)
        taken = db.execute(f"SELECT COALESCE(SUM(credited), 0) FROM contributions WHERE {where}", args).fetchone()[0]
        db.execute(f"UPDATE contributions SET credited = 0 WHERE {where}", args)
        db.execute("UPDATE workers SET tokens_credited = MAX(0, tokens_credited - ?) WHERE id = ?", (taken, worker_id))
        return int(taken)

    def replay_counts(self) -> dict[str, int]:
        """Replays by state, ever."""
        return {r["state"]: r["n"] for r in self.query("SELECT state, COUNT(*) AS n FROM replays GROUP BY state")}

    def recent_replays(self, limit: int) -> list[Row]:
        return self.query("SELECT r.*, w.name FROM replays r LEFT JOIN workers w ON w.id = r.worker_id "
                          "ORDER BY r.requested_at DESC LIMIT ?", (limit,))

    def round_claims(self, round_: int, worker_id: str) -> dict[str, tuple[int, int]]:
        """{lease id: (tokens claimed on it in round_, its shard's train index)}, before the commit credits them."""
        return {r["id"]: (r["claimed"], r["shard_idx"]) for r in self.query(
            "SELECT id, claimed, shard_idx FROM leases WHERE worker_id = ? AND claim_round = ? AND claimed > 0",
            (worker_id, round_))}

"""Rounds and contributions: a round starts, averages, and commits, fails or is rejected.

A round's commit is one transaction: it credits each included lease with what was claimed on it
(a lease whose tokens are all credited is done, and so is its shard), each included worker's
total and the run's budget, counts the flags of the excluded, and starts the next round. The
helpers it calls take its `db` handle and never open a transaction of their own.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Collection, Mapping

from gptswarm.states import OPEN_LEASES, LeaseState, RoundState, ShardState

from .workers import WorkerBook


class RoundBook(WorkerBook):
    def round_tokens(self, round_: int) -> int:
        return self.query("SELECT COALESCE(SUM(tokens), 0) AS n FROM contributions WHERE round = ?",
                          (round_,))[0]["n"]

    def included(self, round_: int, worker_id: str) -> bool:
        rows = self.query("SELECT included FROM contributions WHERE round = ? AND worker_id = ?", (round_, worker_id))
        return bool(rows and rows[0]["included"])

    def group_members(self, round_: int, since: float) -> list[tuple[str, str, int]]:
        """The round's averaging group: every worker still in the swarm and not quarantined, with a
        registered peer id, that held a lease since `since` (the round's start) or has verified
        tokens in it, and its weight, the verified tokens. [(worker_id, peer_id, tokens)]"""
        return [(r["id"], r["peer_id"], r["tokens"]) for r in self.query(
            "SELECT w.id, w.peer_id, COALESCE(c.tokens, 0) AS tokens FROM workers w "
            "LEFT JOIN contributions c ON c.worker_id = w.id AND c.round = ? "
            "WHERE w.left_at IS NULL AND w.quarantined_at IS NULL AND w.peer_id IS NOT NULL AND w.peer_id != '' "
            "AND (c.tokens > 0 OR EXISTS ("
            "SELECT 1 FROM leases l WHERE l.worker_id = w.id AND (l.state IN (?, ?) "
            "OR l.closed_at >= ? OR l.granted_at >= ?))) ORDER BY w.id", (round_, *OPEN_LEASES, since, since))]

    def claimed_shards(self, round_: int, worker_ids: Collection[str]) -> dict[str, list[int]]:
        """{worker id: the shards (train indices) it claimed tokens on in round_, not yet credited}."""
        out: dict[str, list[int]] = {}
        if not worker_ids:
            return out
        marks = ",".join("?" * len(worker_ids))
        for r in self.query(f"SELECT worker_id, shard_idx FROM leases WHERE claim_round = ? AND claimed > 0 "
                            f"AND worker_id IN ({marks}) ORDER BY granted_at", (round_, *worker_ids)):
            out.setdefault(r["worker_id"], []).append(r["shard_idx"])
        return out

    def score_history(self, worker_ids: Collection[str], n: int) -> dict[str, list[float]]:
        """{worker id: its last n scored rounds' ratios (coordinator/scoring.py), newest first}."""
        out: dict[str, list[float]] = {}
        for w in worker_ids:
            rows = self.query("SELECT score FROM contributions WHERE worker_id = ? AND score IS NOT NULL "
                              "ORDER BY round DESC LIMIT ?", (w, n))
            out[w] = [r["score"] for r in rows]
        return out

    def standings(self, worker_ids: Collection[str]) -> dict[str, float]:
        """{worker id: its standing after the last round that scored it} (those never scored are left out)."""
        out = {}
        for w in worker_ids:
            rows = self.query("SELECT standing FROM contributions WHERE worker_id = ? AND standing IS NOT NULL "
                              "ORDER BY round DESC LIMIT 1", (w,))
            if rows:
                out[w] = rows[0]["standing"]
        return out

    def start_round(self, round_: int, theta_hash: str, db: sqlite3.Connection | None = None) -> None:
        if db is None:
            with self.tx() as tx:
                self.start_round(round_, theta_hash, tx)
            return
        db.execute("INSERT OR REPLACE INTO rounds (round, started_at, state, theta_hash) VALUES (?, ?, ?, ?)",
                   (round_, self.clock(), RoundState.TRAINING, theta_hash))
        self.set_meta("round", round_, db)

    def recover(self, round_: int, theta_hash: str) -> None:
        """After a restart from the checkpoint of round_: rounds before it are closed, round_ is
        (again) in training, later rounds never happened."""
        with self.tx() as db:
            db.execute("UPDATE rounds SET state = ?, detail = 'closed by a coordinator restart' "
                       "WHERE round < ? AND state NOT IN (?, ?)", (RoundState.DONE, round_, RoundState.DONE,
                                                                   RoundState.FAILED))
            db.execute("DELETE FROM rounds WHERE round > ?", (round_,))
            row = db.execute("SELECT state FROM rounds WHERE round = ?", (round_,)).fetchone()
            if row is None:
                db.execute("INSERT INTO rounds (round, started_at, state, theta_hash) VALUES (?, ?, ?, ?)",
                           (round_, self.clock(), RoundState.TRAINING, theta_hash))
            else:
                db.execute("UPDATE rounds SET state = ?, theta_hash = ? WHERE round = ?",
                           (RoundState.TRAINING, theta_hash, round_))
            self.set_meta("round", round_, db)

    def set_round_state(self, round_: int, state: RoundState, group_size: int | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE rounds SET state = ?, group_size = COALESCE(?, group_size) WHERE round = ?",
                       (state, group_size, round_))

    def commit_round(self, round_: int, *, included: Mapping[str, int], excluded: Mapping[str, str], theta_hash: str,
                     averaging_seconds: float, flagged: Collection[str] = (), loss: float | None = None,
                     val_loss: float | None = None, bytes_sent: int | None = None,
                     left_out: float | None = None, scores: Mapping[str, tuple] | None = None,
                     revoke: Collection[str] = (), revoke_rounds: int = 0) -> None:
        """Round round_ is done, all at once: included {worker_id: tokens} is credited (the budget,
        each worker's total, and its leases in grant order: a lease whose tokens are all credited is
        done, and so is its shard); excluded {worker_id: reason} gets nothing, and its leases go back;
        those of them in `flagged` count towards quarantine; round_ + 1 starts with theta_hash; left_out:
        the fraction of the members' values the robust rule left out; scores {worker_id: (ratio,
        leased, off, standing, factor, flagged)} (coordinator/scoring.py): an included worker's credit is its
        tokens times its factor (1 if unscored); revoke: workers flagged for their standing, whose
        credit since the first of their last revoke_rounds scored rounds before this one is taken back."""
        tokens = sum(included.values())
        now = self.clock()
        with self.tx() as db:
            db.execute("UPDATE rounds SET ended_at = ?, state = ?, tokens = ?, contributors = ?, "
                       "averaging_seconds = ?, loss = ?, val_loss = ?, bytes_sent = ?, left_out = ? WHERE round = ?",
                       (now, RoundState.DONE, tokens, len(included), averaging_seconds, loss, val_loss, bytes_sent,
                        left_out, round_))
            scores = scores or {}
            quarantined = {r[0] for r in db.execute("SELECT id FROM workers WHERE quarantined_at IS NOT NULL")}
            for wid, t in included.items():
                credited = round(t * scores[wid][4]) if wid in scores else t  # (ratio, leased, off, standing, factor, ...)
                if wid in quarantined:  # quarantined while its round averaged (a replay of an earlier one failed):
                    credited = 0  # its values are in, its credit is not
                db.execute("INSERT INTO contributions (round, worker_id, tokens, included, reason, credited) "
                           "VALUES (?, ?, ?, 1, '', ?) ON CONFLICT (round, worker_id) DO UPDATE SET "
                           "tokens = excluded.tokens, included = 1, credited = excluded.credited", (round_, wid, t, credited))
                db.execute("UPDATE workers SET tokens_contributed = tokens_contributed + ?, "
                           "tokens_credited = tokens_credited + ? WHERE id = ?", (t, credited, wid))
                self._credit(db, wid, t, round_, now)
            self._exclude(db, round_, excluded, flagged)
            for wid, (ratio, leased, off, standing, *_) in scores.items():
                db.execute("UPDATE contributions SET score = ?, score_leased = ?, score_off = ?, standing = ? "
                           "WHERE round = ? AND worker_id = ?", (ratio, leased, off, standing, round_, wid))
            for wid in revoke:  # its standing judges the rounds it is the mean of: their credit goes too, and
                # that of the rounds among them nobody could score it in (alone in its group, say); where those
                # are all its scored rounds, that of every round before them too (none was ever scored), but
                # never a round a replay verified
                scored = db.execute("SELECT MIN(round), COUNT(*) FROM (SELECT round FROM contributions WHERE "
                                    "worker_id = ? AND score IS NOT NULL AND round < ? ORDER BY round DESC LIMIT ?)",
                                    (wid, round_, revoke_rounds)).fetchone()
                since = scored[0] if scored[0] is not None and scored[1] >= revoke_rounds else -1
                since = round_ if scored[0] is None and not revoke_rounds else since
                rows = db.execute("SELECT round, credited FROM contributions WHERE worker_id = ? AND round >= ? "
                                  "AND round < ? AND credited > 0 AND verified IS NULL",
                                  (wid, since, round_)).fetchall()
                taken = sum(r["credited"] or 0 for r in rows)
                db.executemany("UPDATE contributions SET credited = 0 WHERE round = ? AND worker_id = ?",
                               [(r["round"], wid) for r in rows])
                db.execute("UPDATE workers SET tokens_credited = MAX(0, tokens_credited - ?) WHERE id = ?", (taken, wid))
                if taken:
                    self.event("credit_revoked", f"round {round_}: the credit of its last {len(rows)} round(s), "
                               f"{taken} tokens, revoked: its standing is below the flag", wid, db)
            total = json.loads((db.execute("SELECT value FROM meta WHERE key = 'tokens_trained'").fetchone()
                                or ["0"])[0])
            self.set_meta("tokens_trained", total + tokens, db)
            self.start_round(round_ + 1, theta_hash, db)

    def fail_round(self, round_: int, *, excluded: Mapping[str, str], detail: str,
                   averaging_seconds: float | None = None, state: RoundState = RoundState.FAILED,
                   left_out: float | None = None) -> None:
        """Round round_ failed (or its result was rejected: state REJECTED): nothing is credited,
        every member's leases go back, round_ + 1 starts from the same theta. Flags count only in
        rounds that committed: when nobody's contribution stood, the judgement of it is no better."""
        with self.tx() as db:
            row = db.execute("SELECT theta_hash FROM rounds WHERE round = ?", (round_,)).fetchone()
            db.execute("UPDATE rounds SET ended_at = ?, state = ?, tokens = 0, contributors = 0, "
                       "averaging_seconds = ?, detail = ?, left_out = ? WHERE round = ?",
                       (self.clock(), state, averaging_seconds, detail[:300], left_out, round_))
            self._exclude(db, round_, excluded)  # its flags do not count: the round did not stand
            self.event(f"round_{state}", f"round {round_}: {detail}"[:300], None, db)
            self.start_round(round_ + 1, row[0] if row else "", db)

    def set_val_loss(self, round_: int, val_loss: float) -> None:
        """The validation loss of round round_'s new theta, evaluated after its commit."""
        with self.tx() as db:
            db.execute("UPDATE rounds SET val_loss = ? WHERE round = ?", (val_loss, round_))

    def reject_late(self, round_: int, detail: str, val_loss: float) -> None:
        """A committed round whose evaluation failed the safety gate: rejected after the fact (the
        coordinator rolls back to the theta it started from)."""
        with self.tx() as db:
            db.execute("UPDATE rounds SET state = ?, detail = ?, val_loss = ? WHERE round = ?",
                       (RoundState.REJECTED, detail[:300], val_loss if math.isfinite(val_loss) else None, round_))
            self.event("round_rejected", f"round {round_}: {detail}", None, db)

    def request_rollback(self, to_round: int) -> None:
        """The operator asks for theta_global to go back to round to_round's (applied by the
        coordinator between rounds, or at its next start)."""
        self.set_meta("rollback_to", to_round)

    def rollback(self, round_: int, *, to_round: int, theta_hash: str, tokens_trained: int) -> None:
        """Apply a requested rollback: round round_ ends without a result, round round_ + 1 starts
        from round to_round's theta (theta_hash), and the budget counts what that theta had trained."""
        detail = f"rolled back to round {to_round}'s theta by the operator"
        with self.tx() as db:
            db.execute("UPDATE rounds SET ended_at = ?, state = ?, tokens = 0, contributors = 0, detail = ? "
                       "WHERE round = ?", (self.clock(), RoundState.FAILED, detail, round_))
            db.execute("DELETE FROM meta WHERE key = 'rollback_to'")
            self.set_meta("tokens_trained", tokens_trained, db)
            self.event("rollback", detail, None, db)
            self.start_round(round_ + 1, theta_hash, db)

    def _credit(self, db: sqlite3.Connection, worker_id: str, tokens: int, round_: int, now: float) -> None:
        """Credit each of the worker's leases with what it claimed on it in round_ (up to `tokens`
        in all, the leases it finished first)."""
        rows = db.execute("SELECT id, shard_idx, tokens, credited, claimed, state FROM leases WHERE worker_id = ? AND "
                          "claim_round = ? AND claimed > 0 ORDER BY state = ? DESC, granted_at, rowid",
                          (worker_id, round_, LeaseState.TRAINED)).fetchall()
        for r in rows:
            add = min(tokens, r["claimed"])
            tokens -= add
            if r["credited"] + add >= r["tokens"] and r["state"] in OPEN_LEASES:
                db.execute("UPDATE leases SET credited = tokens, claimed = 0, state = ?, done_round = ?, "
                           "closed_at = ? WHERE id = ?", (LeaseState.DONE, round_, now, r["id"]))
                db.execute("UPDATE shards SET state = ?, done_round = ?, done_by = ?, times_done = times_done + 1 "
                           "WHERE idx = ? AND state = ?", (ShardState.DONE, round_, worker_id, r["shard_idx"],
                                                          ShardState.LEASED))
            else:
                db.execute("UPDATE leases SET credited = credited + ?, claimed = 0 WHERE id = ?", (add, r["id"]))

    def _exclude(self, db: sqlite3.Connection, round_: int, excluded: Mapping[str, str],
                 flagged: Collection[str] = ()) -> None:
        for wid, reason in excluded.items():
            db.execute("INSERT INTO contributions (round, worker_id, tokens, included, reason, flagged) "
                       "VALUES (?, ?, 0, 0, ?, ?) ON CONFLICT (round, worker_id) DO UPDATE SET included = 0, "
                       "reason = excluded.reason, flagged = excluded.flagged", (round_, wid, reason, int(wid in flagged)))
            self.event("contribution_rejected", f"round {round_}: {reason}", wid, db)
            self._release(db, wid, None)
            if wid in flagged:
                self._quarantine_if_repeated(db, wid)

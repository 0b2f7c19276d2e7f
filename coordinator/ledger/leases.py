"""Shards, their leases, and the tokens workers claim on them.

Leases are BOINC-style: a lease has a deadline that heartbeats extend; an expired lease returns
its shard to the queue; the next epoch starts only when every shard of this one is done. A lease
is `active` while its worker trains it, `trained` once the worker says it finished (then it no
longer counts against the worker's cap of active leases), and `done` once the tokens the ledger
credited to the worker's included contributions cover all of its tokens; `expired` and
`released` leases gave their shard back.

Every number a worker claims is clamped here against what the ledger knows: the tokens it trained
on a lease in a round cannot exceed what is left of the lease's tokens (less what earlier rounds
credited), a round's claim is the sum over the leases the worker held in it, and that cannot
exceed what the fastest machine could have trained since the round began.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from gptswarm.states import OPEN_LEASES, LeaseState, ShardState

from .events import EventLog
from .store import Row


class LeaseBook(EventLog):
    lease_seconds: float  # how long a lease lives without a heartbeat
    max_leases: int  # active leases a worker may hold at once
    max_tokens_per_second: float  # the fastest a worker could possibly train (claims beyond are clamped)

    # --- shards ---

    def add_shards(self, shards: Sequence[tuple[str, int]]) -> None:
        """shards: [(sha256, tokens)] in order; only on a new ledger."""
        with self.tx() as db:
            if db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]:
                return
            db.executemany("INSERT INTO shards (idx, sha256, tokens) VALUES (?, ?, ?)",
                           [(i, sha, n) for i, (sha, n) in enumerate(shards)])
            self._shuffle(db, 0)
            self.set_meta("epoch", 0, db)

    @staticmethod
    def _shuffle(db: sqlite3.Connection, epoch: int) -> None:
        """Lease order for an epoch: a permutation seeded by the epoch number, so that workers see
        the data in a different, reproducible order each epoch (not the file's order)."""
        n = db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
        ranks = list(range(n))
        random.Random(f"gptswarm-epoch-{epoch}").shuffle(ranks)
        db.executemany("UPDATE shards SET rank = ? WHERE idx = ?", [(r, i) for i, r in enumerate(ranks)])

    def shard(self, idx: int) -> Row | None:
        rows = self.query("SELECT * FROM shards WHERE idx = ?", (idx,))
        return rows[0] if rows else None

    # --- claims ---

    def _claim(self, db: sqlite3.Connection, worker_id: str, round_: int, lease_tokens: Mapping[str, int],
               now: float) -> int:
        """Record a worker's claims {lease_id: tokens trained on it in the current round round_},
        each clamped to what is left of the lease, and their sum to what the worker could have
        trained since the round (or its session) began; the verified tokens of its round. A claim on
        a round the ledger has ended meanwhile (the caller saw the round keeper's view just before
        the round's commit moved it) is late, not false: it changes nothing."""
        current = db.execute("SELECT value FROM meta WHERE key = 'round'").fetchone()
        if current is not None and json.loads(current[0]) != round_:
            row = db.execute("SELECT tokens FROM contributions WHERE round = ? AND worker_id = ?",
                             (round_, worker_id)).fetchone()
            return row[0] if row else 0
        started = db.execute("SELECT started_at FROM rounds WHERE round = ?", (round_,)).fetchone()
        started = started[0] if started else now
        for lid, claimed in lease_tokens.items():
            row = db.execute("SELECT tokens, credited, claimed, claim_round FROM leases WHERE id = ? AND worker_id = ? "
                             "AND (state IN (?, ?) OR closed_at >= ?)",
                             (lid, worker_id, *OPEN_LEASES, started)).fetchone()
            if row is None:
                self.refuse("tokens_clamped", f"claimed {claimed} tokens on lease {lid[:40]}, which it did not hold "
                            f"in round {round_}", worker_id, db)
                continue
            room = row["tokens"] - row["credited"]
            if claimed > room:
                self.refuse("tokens_clamped", f"claimed {claimed} tokens on lease {lid[:40]} in round {round_}; "
                            f"it has {room} left", worker_id, db)
            before = row["claimed"] if row["claim_round"] == round_ else 0
            db.execute("UPDATE leases SET claimed = ?, claim_round = ? WHERE id = ?",
                       (max(before, min(claimed, room)), round_, lid))
        total = db.execute("SELECT COALESCE(SUM(claimed), 0) FROM leases WHERE worker_id = ? AND claim_round = ?",
                           (worker_id, round_)).fetchone()[0]
        since = max(started, db.execute("SELECT active_since FROM workers WHERE id = ?",
                                        (worker_id,)).fetchone()[0] or now)
        possible = (now - since) * self.max_tokens_per_second if now > since else 0.0
        if total > possible:
            self.refuse("tokens_clamped", f"claimed {total} tokens in round {round_}, more than the fastest machine "
                        f"could have trained in {now - since:.1f} s", worker_id, db)
        verified = int(min(total, possible))
        db.execute("INSERT INTO contributions (round, worker_id, tokens) VALUES (?, ?, ?) "
                   "ON CONFLICT (round, worker_id) DO UPDATE SET tokens = excluded.tokens", (round_, worker_id, verified))
        return verified

    def claim(self, worker_id: str, round_: int, lease_tokens: Mapping[str, int]) -> int:
        """Record the worker's claims for the current round round_ (see _claim); its verified tokens."""
        with self.tx() as db:
            return self._claim(db, worker_id, round_, lease_tokens, self.clock())

    def heartbeat(self, worker_id: str, *, current_round: int, round_: int, lease_tokens: Mapping[str, int],
                  tps: float, state: str, reason: str, lease_ids: Iterable[str], bytes_sent: int,
                  loss: float | None) -> tuple[float, list[str]]:
        """Record a heartbeat (the caller checked each value's type and range). Its claims
        {lease_id: tokens trained on it in round_} count only for the current round, clamped
        (_claim); it extends the worker's named leases.
        Returns (deadline, lost): lost are the named leases that no longer hold a shard."""
        now = self.clock()
        deadline = now + self.lease_seconds
        with self.tx() as db:
            db.execute("UPDATE workers SET last_seen = ?, state = ?, reason = ?, tokens_per_second = ?, "
                       "bytes_sent = MAX(bytes_sent, ?), loss = COALESCE(?, loss) WHERE id = ?",
                       (now, state, reason, tps, bytes_sent, loss, worker_id))
            if round_ > current_round:
                self.refuse("future_round", f"heartbeat for round {round_}; the current round is {current_round}",
                            worker_id, db)
            elif round_ == current_round and lease_tokens:
                self._claim(db, worker_id, round_, lease_tokens, now)
            lost: list[str] = []
            for lid in lease_ids:
                cur = db.execute("UPDATE leases SET deadline = ? WHERE id = ? AND worker_id = ? AND state IN (?, ?)",
                                 (deadline, lid, worker_id, *OPEN_LEASES))
                if cur.rowcount == 0:
                    lost.append(lid)
        return deadline, lost

    # --- leases ---

    def lease(self, worker_id: str, round_: int) -> dict[str, Any] | str:
        """Lease the next pending shard of the current epoch to worker_id: a dict, or a string that
        says why not (every shard of the epoch leased or done, or the worker at its cap of active
        leases). A finished epoch starts the next."""
        now = self.clock()
        with self.tx() as db:
            self._expire(db, now)
            quarantine = db.execute("SELECT quarantine_reason FROM workers WHERE id = ? AND quarantined_at IS NOT NULL",
                                    (worker_id,)).fetchone()
            if quarantine is not None:
                return f"quarantined: {quarantine[0]}; the operator can lift it"
            active = db.execute("SELECT COUNT(*) FROM leases WHERE worker_id = ? AND state = ?",
                                (worker_id, LeaseState.ACTIVE)).fetchone()[0]
            if active >= self.max_leases:
                self.refuse("lease_cap", f"asked for a lease while holding {active} active ones "
                            f"(at most {self.max_leases})", worker_id, db)
                return f"at most {self.max_leases} active lease(s) per worker: finish or release one first"
            if db.execute("SELECT COUNT(*) FROM shards WHERE state != ?", (ShardState.DONE,)).fetchone()[0] == 0:
                epoch = json.loads(db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]) + 1
                db.execute("UPDATE shards SET state = ?, epoch = ?", (ShardState.PENDING, epoch))
                self._shuffle(db, epoch)
                self.set_meta("epoch", epoch, db)
                self.event("epoch", f"epoch {epoch} begins", None, db)
            row = db.execute("SELECT * FROM shards WHERE state = ? ORDER BY rank LIMIT 1",
                             (ShardState.PENDING,)).fetchone()
            if row is None:
                return "no shards available: all are leased, waiting for reports"
            lease_id = "l-" + secrets.token_hex(8)
            deadline = now + self.lease_seconds
            db.execute("UPDATE shards SET state = ? WHERE idx = ?", (ShardState.LEASED, row["idx"]))
            db.execute("INSERT INTO leases (id, shard_idx, worker_id, epoch, round, granted_at, deadline, state, tokens) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (lease_id, row["idx"], worker_id, row["epoch"], round_,
                                                             now, deadline, LeaseState.ACTIVE, row["tokens"]))
            return {"lease_id": lease_id, "shard_index": row["idx"], "sha256": row["sha256"],
                    "tokens": row["tokens"], "deadline": deadline, "epoch": row["epoch"]}

    def finish_leases(self, worker_id: str, lease_ids: Iterable[str], *, current_round: int, round_: int,
                      lease_tokens: Mapping[str, int]) -> None:
        """The worker says it finished training these leases (and claims lease_tokens in round_, as
        in heartbeat). A lease counts as trained only if it is the worker's, active, and what the
        ledger credited and verified on it covers all of its tokens. A request of a round that is
        over (the round committed, failed or was rolled back while it was on its way) can claim
        nothing: a lease it names that is not covered yet stays active, unrefused (an honest worker
        sends such a request; the round's result tells it to report the lease or give it back)."""
        with self.tx() as db:
            stale = round_ != current_round
            if not stale and lease_tokens:
                self._claim(db, worker_id, round_, lease_tokens, self.clock())
            for lid in lease_ids:
                row = db.execute("SELECT tokens, credited, claimed, claim_round, state FROM leases "
                                 "WHERE id = ? AND worker_id = ?", (lid, worker_id)).fetchone()
                if row is None or row["state"] != LeaseState.ACTIVE:
                    continue  # not its lease, or no longer held: nothing to finish
                claimed = row["claimed"] if row["claim_round"] == current_round else 0
                if row["credited"] + claimed < row["tokens"]:
                    if stale:
                        continue
                    self.refuse("finish_refused", f"said it finished lease {lid[:40]} but claimed only "
                                f"{row['credited'] + claimed} of its {row['tokens']} tokens", worker_id, db)
                    continue
                db.execute("UPDATE leases SET state = ? WHERE id = ?", (LeaseState.TRAINED, lid))

    def lease_row(self, lease_id: str) -> Row | None:
        rows = self.query("SELECT * FROM leases WHERE id = ?", (lease_id,))
        return rows[0] if rows else None

    def report(self, worker_id: str, lease_id: str, round_: int, loss: float | None) -> tuple[bool, str]:
        """The worker reports a lease it trained in round_. Accepted only if round_'s included
        contribution of this worker covered the lease's tokens (the round's commit then marked it
        done). Returns (accepted, detail); a duplicate or unfounded report changes nothing."""
        with self.tx() as db:
            lease = db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if lease is None or lease["worker_id"] != worker_id:
                self.refuse("report_refused", f"reported lease {lease_id[:40]}, which is not its own", worker_id, db)
                return False, "unknown lease"
            if lease["state"] != LeaseState.DONE or lease["done_round"] != round_:
                self.refuse("report_refused", f"reported lease {lease_id} for round {round_}, whose included "
                            "contribution does not cover it", worker_id, db)
                return False, f"round {round_}'s included contribution does not cover this lease ({lease['state']})"
            if lease["reported_at"] is not None:
                return False, "duplicate report: already counted"
            db.execute("UPDATE leases SET reported_at = ?, loss = ? WHERE id = ?", (self.clock(), loss, lease_id))
            return True, "counted"

    def release(self, worker_id: str, lease_ids: Collection[str] | None = None) -> int:
        with self.tx() as db:
            n = self._release(db, worker_id, lease_ids)
            if n:
                self.event("release", f"returned {n} lease(s)", worker_id, db)
            return n

    def _release(self, db: sqlite3.Connection, worker_id: str, lease_ids: Collection[str] | None) -> int:
        rows = db.execute("SELECT id, shard_idx FROM leases WHERE worker_id = ? AND state IN (?, ?)",
                          (worker_id, *OPEN_LEASES)).fetchall()
        rows = [r for r in rows if lease_ids is None or r["id"] in lease_ids]
        for r in rows:
            db.execute("UPDATE leases SET state = ?, closed_at = ? WHERE id = ?",
                       (LeaseState.RELEASED, self.clock(), r["id"]))
            db.execute("UPDATE shards SET state = ? WHERE idx = ? AND state = ?",
                       (ShardState.PENDING, r["shard_idx"], ShardState.LEASED))
        return len(rows)

    def expire(self) -> int:
        with self.tx() as db:
            return self._expire(db, self.clock())

    def _expire(self, db: sqlite3.Connection, now: float) -> int:
        rows = db.execute("SELECT id, shard_idx, worker_id FROM leases WHERE state IN (?, ?) AND deadline < ?",
                          (*OPEN_LEASES, now)).fetchall()
        for r in rows:
            db.execute("UPDATE leases SET state = ?, closed_at = ? WHERE id = ?", (LeaseState.EXPIRED, now, r["id"]))
            db.execute("UPDATE shards SET state = ? WHERE idx = ? AND state = ?",
                       (ShardState.PENDING, r["shard_idx"], ShardState.LEASED))
            self.event("lease_expired", f"shard {r['shard_idx']} back in the queue", r["worker_id"], db)
        return len(rows)

"""The coordinator's ledger: one SQLite database (WAL) in the state directory.

Tables: workers, shards, leases, rounds, contributions, events, meta. Every change is one
transaction, so a coordinator killed at any moment restarts with a consistent ledger.

Leases are BOINC-style: a lease has a deadline that heartbeats extend; an expired lease returns
its shard to the queue; a shard is counted done once per epoch, so a late or repeated report never
counts tokens twice; the next epoch starts only when every shard of this one is done.
"""

import contextlib
import hashlib
import json
import random
import secrets
import sqlite3
import threading
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, device TEXT, peer_id TEXT, client_mode INTEGER,
    session_hash TEXT UNIQUE, joined_at REAL, last_seen REAL, left_at REAL,
    state TEXT, reason TEXT, tokens_per_second REAL DEFAULT 0, loss REAL,
    tokens_contributed INTEGER DEFAULT 0, bytes_sent INTEGER DEFAULT 0, eligible_round INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS shards (
    idx INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, tokens INTEGER NOT NULL,
    rank INTEGER NOT NULL DEFAULT 0,  -- lease order within the epoch (a seeded shuffle per epoch)
    epoch INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'pending',  -- pending | leased | done
    done_round INTEGER, done_by TEXT, times_done INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY, shard_idx INTEGER NOT NULL, worker_id TEXT NOT NULL, epoch INTEGER NOT NULL,
    round INTEGER NOT NULL, granted_at REAL NOT NULL, deadline REAL NOT NULL,
    state TEXT NOT NULL,  -- active | reported | expired | released
    tokens INTEGER, loss REAL, closed_at REAL);
CREATE INDEX IF NOT EXISTS leases_active ON leases (state, deadline);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, started_at REAL, ended_at REAL,
    state TEXT NOT NULL,  -- training | averaging | done | failed
    tokens INTEGER DEFAULT 0, contributors INTEGER DEFAULT 0, theta_hash TEXT, loss REAL, val_loss REAL,
    averaging_seconds REAL, bytes_sent INTEGER, detail TEXT);
CREATE TABLE IF NOT EXISTS contributions (
    round INTEGER NOT NULL, worker_id TEXT NOT NULL, tokens INTEGER NOT NULL DEFAULT 0,
    included INTEGER, reason TEXT, PRIMARY KEY (round, worker_id));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, worker_id TEXT, detail TEXT);
"""


ONLINE_HEARTBEATS = 3  # a worker is online while its last heartbeat is this many intervals old at most,
ONLINE_SLACK = 5.0  # plus this many seconds


def digest(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


class Ledger:
    """The only code that knows the schema: everything else asks it named questions.

    lease_seconds: how long a lease lives without a heartbeat; heartbeat_interval: how often workers
    beat (it defines who is online); clock: time source (tests pass a fake one)."""

    def __init__(self, path, *, lease_seconds, heartbeat_interval, clock=time.time):
        self.path = str(path)
        self.lease_seconds = lease_seconds
        self.heartbeat_interval = heartbeat_interval
        self.clock = clock
        self.lock = threading.RLock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self):
        with self.lock:
            self.db.close()

    @contextlib.contextmanager
    def tx(self):
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) under the ledger lock; yields the connection."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def query(self, sql, args=()):
        with self.lock:
            return [dict(r) for r in self.db.execute(sql, args).fetchall()]

    # --- meta ---

    def get_meta(self, key, default=None):
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_meta(self, key, value, db=None):
        sql, args = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value))
        if db is not None:
            db.execute(sql, args)
        else:
            with self.tx() as db:
                db.execute(sql, args)

    def event(self, kind, detail="", worker_id=None, db=None):
        args = (self.clock(), kind, worker_id, detail)
        if db is not None:
            db.execute("INSERT INTO events (at, kind, worker_id, detail) VALUES (?, ?, ?, ?)", args)
        else:
            with self.tx() as db:
                db.execute("INSERT INTO events (at, kind, worker_id, detail) VALUES (?, ?, ?, ?)", args)

    # --- shards ---

    def add_shards(self, shards):
        """shards: [(sha256, tokens)] in order; only on a new ledger."""
        with self.tx() as db:
            if db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]:
                return
            db.executemany("INSERT INTO shards (idx, sha256, tokens) VALUES (?, ?, ?)",
                           [(i, sha, n) for i, (sha, n) in enumerate(shards)])
            self._shuffle(db, 0)
            self.set_meta("epoch", 0, db)

    @staticmethod
    def _shuffle(db, epoch):
        """Lease order for an epoch: a permutation seeded by the epoch number, so that workers see
        the data in a different, reproducible order each epoch (not the file's order)."""
        n = db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
        ranks = list(range(n))
        random.Random(f"gptswarm-epoch-{epoch}").shuffle(ranks)
        db.executemany("UPDATE shards SET rank = ? WHERE idx = ?", [(r, i) for i, r in enumerate(ranks)])

    def shard(self, idx):
        rows = self.query("SELECT * FROM shards WHERE idx = ?", (idx,))
        return rows[0] if rows else None

    def shard_counts(self):
        rows = self.query("SELECT state, COUNT(*) AS n FROM shards GROUP BY state")
        counts = {"pending": 0, "leased": 0, "done": 0}
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    # --- workers ---

    def add_worker(self, *, name, device, peer_id, client_mode, current_round, round_started):
        """A new worker and its session secret. It may train in the current round only if that
        round has not started yet (no tokens trained in it); otherwise from the next one."""
        worker_id = "w-" + secrets.token_hex(4)
        session = secrets.token_urlsafe(24)
        now = self.clock()
        eligible = current_round + 1 if round_started else current_round
        with self.tx() as db:
            db.execute("INSERT INTO workers (id, name, device, peer_id, client_mode, session_hash, joined_at, "
                       "last_seen, state, reason, eligible_round) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'joining', '', ?)",
                       (worker_id, name, device, peer_id, int(client_mode), digest(session), now, now, eligible))
            self.event("join", f"{name} ({device})", worker_id, db)
        return worker_id, session

    def worker_for_session(self, session):
        rows = self.query("SELECT * FROM workers WHERE session_hash = ?", (digest(session),))
        return rows[0] if rows else None

    def worker(self, worker_id):
        rows = self.query("SELECT * FROM workers WHERE id = ?", (worker_id,))
        return rows[0] if rows else None

    def heartbeat(self, worker_id, *, round_, round_tokens, tps, state, reason, lease_ids, bytes_sent, loss):
        """Record a heartbeat; extends the worker's named active leases. Returns (deadline, lost)
        where lost are the named leases that are no longer active."""
        now = self.clock()
        deadline = now + self.lease_seconds
        with self.tx() as db:
            db.execute("UPDATE workers SET last_seen = ?, state = ?, reason = ?, tokens_per_second = ?, "
                       "bytes_sent = MAX(bytes_sent, ?), loss = COALESCE(?, loss) WHERE id = ?",
                       (now, state, reason, tps, bytes_sent, loss, worker_id))
            if round_tokens:
                db.execute("INSERT INTO contributions (round, worker_id, tokens) VALUES (?, ?, ?) "
                           "ON CONFLICT (round, worker_id) DO UPDATE SET tokens = MAX(tokens, excluded.tokens)",
                           (round_, worker_id, round_tokens))
            lost = []
            for lid in lease_ids:
                cur = db.execute("UPDATE leases SET deadline = ? WHERE id = ? AND worker_id = ? AND state = 'active'",
                                 (deadline, lid, worker_id))
                if cur.rowcount == 0:
                    lost.append(lid)
        return deadline, lost

    def online_after(self):
        """The one definition of an online worker: it has not left, and its last heartbeat came
        after this time."""
        return self.clock() - (ONLINE_HEARTBEATS * self.heartbeat_interval + ONLINE_SLACK)

    def swarm_tokens_per_second(self):
        """Sum of the online, training workers' throughput."""
        return self.query("SELECT COALESCE(SUM(tokens_per_second), 0) AS n FROM workers WHERE left_at IS NULL "
                          "AND last_seen > ? AND state = 'training'", (self.online_after(),))[0]["n"]

    def anyone_training(self):
        """Is an online worker training right now?"""
        return bool(self.query("SELECT 1 FROM workers WHERE state = 'training' AND last_seen > ? AND left_at IS NULL "
                               "LIMIT 1", (self.online_after(),)))

    def workers_for_status(self):
        """Every worker, most tokens contributed first, with `online` set."""
        rows = self.query("SELECT id, name, device, client_mode, state, reason, tokens_per_second, tokens_contributed, "
                          "last_seen, left_at, joined_at, bytes_sent FROM workers "
                          "ORDER BY tokens_contributed DESC, joined_at")
        cutoff = self.online_after()
        for w in rows:
            w["online"] = w["left_at"] is None and (w["last_seen"] or 0) > cutoff
        return rows

    def come_back(self, worker_id, *, current_round, round_started):
        """A worker that left (or crashed) is back with its session: same identity, same totals;
        like a new worker, it waits for the next round if this one is under way."""
        with self.tx() as db:
            db.execute("UPDATE workers SET left_at = NULL, state = 'joining', reason = '', last_seen = ?, "
                       "eligible_round = ? WHERE id = ?",
                       (self.clock(), current_round + 1 if round_started else current_round, worker_id))
            self.event("rejoin", "back with its session", worker_id, db)

    def leave(self, worker_id):
        with self.tx() as db:
            db.execute("UPDATE workers SET left_at = ?, state = 'offline', reason = 'left' WHERE id = ?",
                       (self.clock(), worker_id))
            n = self._release(db, worker_id, None)
            self.event("leave", f"returned {n} lease(s)", worker_id, db)

    # --- leases ---

    def lease(self, worker_id, round_):
        """Lease the next pending shard of the current epoch to worker_id, or None when every shard
        of the epoch is leased or done (and not all done). A finished epoch starts the next."""
        now = self.clock()
        with self.tx() as db:
            self._expire(db, now)
            if db.execute("SELECT COUNT(*) FROM shards WHERE state != 'done'").fetchone()[0] == 0:
                epoch = json.loads(db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]) + 1
                db.execute("UPDATE shards SET state = 'pending', epoch = ?", (epoch,))
                self._shuffle(db, epoch)
                self.set_meta("epoch", epoch, db)
                self.event("epoch", f"epoch {epoch} begins", None, db)
            row = db.execute("SELECT * FROM shards WHERE state = 'pending' ORDER BY rank LIMIT 1").fetchone()
            if row is None:
                return None
            lease_id = "l-" + secrets.token_hex(8)
            deadline = now + self.lease_seconds
            db.execute("UPDATE shards SET state = 'leased' WHERE idx = ?", (row["idx"],))
            db.execute("INSERT INTO leases (id, shard_idx, worker_id, epoch, round, granted_at, deadline, state) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, 'active')", (lease_id, row["idx"], worker_id, row["epoch"],
                                                                   round_, now, deadline))
            return {"lease_id": lease_id, "shard_index": row["idx"], "sha256": row["sha256"],
                    "tokens": row["tokens"], "deadline": deadline, "epoch": row["epoch"]}

    def lease_holders_since(self, since):
        """How many workers still in the swarm held a lease at some time since `since`: the ones who
        can have trained tokens since then (a lease in progress, or one reported, released or
        expired since). Errs high: a worker counted here that does not turn up costs the round
        its matchmaking window, nothing else."""
        return self.query("SELECT COUNT(DISTINCT l.worker_id) AS n FROM leases l JOIN workers w ON w.id = l.worker_id "
                          "WHERE w.left_at IS NULL AND (l.state = 'active' OR l.closed_at >= ? OR l.granted_at >= ?)",
                          (since, since))[0]["n"]

    def lease_row(self, lease_id):
        rows = self.query("SELECT * FROM leases WHERE id = ?", (lease_id,))
        return rows[0] if rows else None

    def report(self, worker_id, lease_id, round_, tokens, loss):
        """Mark a leased shard done. Returns (accepted, detail); a duplicate, late or foreign report
        changes nothing."""
        now = self.clock()
        with self.tx() as db:
            lease = db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if lease is None or lease["worker_id"] != worker_id:
                return False, "unknown lease"
            if lease["state"] == "reported":
                return False, "duplicate report: already counted"
            if lease["state"] != "active":
                return False, f"lease {lease['state']}: the shard went back to the queue"
            shard = db.execute("SELECT * FROM shards WHERE idx = ?", (lease["shard_idx"],)).fetchone()
            db.execute("UPDATE leases SET state = 'reported', tokens = ?, loss = ?, closed_at = ? WHERE id = ?",
                       (tokens, loss, now, lease_id))
            db.execute("UPDATE shards SET state = 'done', done_round = ?, done_by = ?, times_done = times_done + 1 "
                       "WHERE idx = ?", (round_, worker_id, shard["idx"]))
            return True, "counted"

    def release(self, worker_id, lease_ids=None):
        with self.tx() as db:
            n = self._release(db, worker_id, lease_ids)
            if n:
                self.event("release", f"returned {n} lease(s)", worker_id, db)
            return n

    def _release(self, db, worker_id, lease_ids):
        rows = db.execute("SELECT id, shard_idx FROM leases WHERE worker_id = ? AND state = 'active'",
                          (worker_id,)).fetchall()
        rows = [r for r in rows if lease_ids is None or r["id"] in lease_ids]
        for r in rows:
            db.execute("UPDATE leases SET state = 'released', closed_at = ? WHERE id = ?", (self.clock(), r["id"]))
            db.execute("UPDATE shards SET state = 'pending' WHERE idx = ? AND state = 'leased'", (r["shard_idx"],))
        return len(rows)

    def expire(self):
        with self.tx() as db:
            return self._expire(db, self.clock())

    def _expire(self, db, now):
        rows = db.execute("SELECT id, shard_idx, worker_id FROM leases WHERE state = 'active' AND deadline < ?",
                          (now,)).fetchall()
        for r in rows:
            db.execute("UPDATE leases SET state = 'expired', closed_at = ? WHERE id = ?", (now, r["id"]))
            db.execute("UPDATE shards SET state = 'pending' WHERE idx = ? AND state = 'leased'", (r["shard_idx"],))
            self.event("lease_expired", f"shard {r['shard_idx']} back in the queue", r["worker_id"], db)
        return len(rows)

    # --- rounds and contributions ---

    def round_tokens(self, round_):
        return self.query("SELECT COALESCE(SUM(tokens), 0) AS n FROM contributions WHERE round = ?",
                          (round_,))[0]["n"]

    def start_round(self, round_, theta_hash):
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO rounds (round, started_at, state, theta_hash) VALUES (?, ?, 'training', ?)",
                       (round_, self.clock(), theta_hash))
            self.set_meta("round", round_, db)

    def recover(self, round_, theta_hash):
        """After a restart from the checkpoint of round_: rounds before it are closed, round_ is
        (again) in training, later rounds never happened."""
        with self.tx() as db:
            db.execute("UPDATE rounds SET state = 'done', detail = 'closed by a coordinator restart' "
                       "WHERE round < ? AND state NOT IN ('done', 'failed')", (round_,))
            db.execute("DELETE FROM rounds WHERE round > ?", (round_,))
            row = db.execute("SELECT state FROM rounds WHERE round = ?", (round_,)).fetchone()
            if row is None:
                db.execute("INSERT INTO rounds (round, started_at, state, theta_hash) VALUES (?, ?, 'training', ?)",
                           (round_, self.clock(), theta_hash))
            else:
                db.execute("UPDATE rounds SET state = 'training', theta_hash = ? WHERE round = ?", (theta_hash, round_))
            self.set_meta("round", round_, db)

    def set_round_state(self, round_, state):
        with self.tx() as db:
            db.execute("UPDATE rounds SET state = ? WHERE round = ?", (state, round_))

    def finish_round(self, round_, *, state, included, excluded, averaging_seconds, loss=None, val_loss=None,
                     bytes_sent=None, detail=""):
        """Close a round: included/excluded map worker_id -> (tokens, reason)."""
        tokens = sum(t for t, _ in included.values())
        with self.tx() as db:
            db.execute("UPDATE rounds SET ended_at = ?, state = ?, tokens = ?, contributors = ?, averaging_seconds = ?, "
                       "loss = ?, val_loss = ?, bytes_sent = ?, detail = ? WHERE round = ?",
                       (self.clock(), state, tokens, len(included), averaging_seconds, loss, val_loss, bytes_sent,
                        detail, round_))
            for wid, (t, reason) in included.items():
                db.execute("INSERT INTO contributions (round, worker_id, tokens, included, reason) VALUES (?, ?, ?, 1, ?) "
                           "ON CONFLICT (round, worker_id) DO UPDATE SET tokens = excluded.tokens, included = 1, "
                           "reason = excluded.reason", (round_, wid, t, reason))
                db.execute("UPDATE workers SET tokens_contributed = tokens_contributed + ? WHERE id = ?", (t, wid))
            for wid, (t, reason) in excluded.items():
                db.execute("INSERT INTO contributions (round, worker_id, tokens, included, reason) VALUES (?, ?, ?, 0, ?) "
                           "ON CONFLICT (round, worker_id) DO UPDATE SET included = 0, reason = excluded.reason",
                           (round_, wid, t, reason))
                self.event("contribution_rejected", f"round {round_}: {reason}", wid, db)
            if state == "done":
                total = json.loads((db.execute("SELECT value FROM meta WHERE key = 'tokens_trained'").fetchone()
                                    or ["0"])[0])
                self.set_meta("tokens_trained", total + tokens, db)
            else:
                self.event("round_failed", f"round {round_}: {detail}", None, db)

    def round_rows(self, *rounds):
        """{round: its row} for those of `rounds` the ledger knows."""
        marks = ", ".join("?" * len(rounds))
        return {r["round"]: r for r in self.query(f"SELECT * FROM rounds WHERE round IN ({marks})", rounds)}

    def finished_rounds(self, limit):
        """The last `limit` done or failed rounds, oldest first."""
        return self.query("SELECT round, started_at, ended_at, state, tokens, contributors, loss, val_loss, "
                          "averaging_seconds, bytes_sent, detail FROM rounds WHERE state IN ('done', 'failed') "
                          "ORDER BY round DESC LIMIT ?", (limit,))[::-1]

    def round_counts(self):
        """{state: number of rounds}."""
        return {r["state"]: r["n"] for r in self.query("SELECT state, COUNT(*) AS n FROM rounds GROUP BY state")}

    def averaging_totals(self):
        """Bytes the coordinator and the workers sent for averaging, and seconds spent averaging."""
        rounds = self.query("SELECT COALESCE(SUM(bytes_sent), 0) AS b, COALESCE(SUM(averaging_seconds), 0) AS s "
                            "FROM rounds")[0]
        workers = self.query("SELECT COALESCE(SUM(bytes_sent), 0) AS b FROM workers")[0]
        return {"coordinator_bytes": rounds["b"], "worker_bytes": workers["b"], "seconds": rounds["s"]}

    def recent_events(self, limit):
        """The last `limit` events, newest first, with the worker's name."""
        return self.query("SELECT e.at, e.kind, e.detail, w.name FROM events e LEFT JOIN workers w ON "
                          "w.id = e.worker_id ORDER BY e.id DESC LIMIT ?", (limit,))

    def count_events(self, kind, since=0.0):
        return self.query("SELECT COUNT(*) AS n FROM events WHERE kind = ? AND at > ?", (kind, since))[0]["n"]

    def included(self, round_, worker_id):
        rows = self.query("SELECT included FROM contributions WHERE round = ? AND worker_id = ?", (round_, worker_id))
        return bool(rows and rows[0]["included"])

"""The coordinator's ledger: one SQLite database (WAL) in the state directory, and the only code
that knows its schema; everything else asks it named questions.

Tables: workers, shards, leases, rounds, contributions, refusals, events, meta. Every change is one
transaction, so a coordinator killed at any moment restarts with a consistent ledger.

Leases are BOINC-style: a lease has a deadline that heartbeats extend; an expired lease returns
its shard to the queue; the next epoch starts only when every shard of this one is done. A lease
is `active` while its worker trains it, `trained` once the worker says it finished (then it no
longer counts against the worker's cap of active leases), and `done` once the tokens the ledger
credited to the worker's included contributions cover all of its tokens; `expired` and
`released` leases gave their shard back.

Every number a worker claims is clamped here against what the ledger knows: the tokens it trained
on a lease in a round cannot exceed what is left of the lease's tokens (less what earlier rounds
credited), a round's claim is the sum over the leases the worker held in it, and that cannot
exceed what the fastest machine could have trained since the round began. A round's commit
credits each included lease with what was claimed on it: a lease whose tokens are all credited is
done, and so is its shard.
A refused or clamped claim is counted per worker and kind (`refusals`) and written as an event,
at most once a minute per worker and kind.
"""

import contextlib
import hashlib
import hmac
import json
import math
import random
import secrets
import sqlite3
import threading
import time

SCHEMA_VERSION = 4
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, device TEXT, peer_id TEXT, client_mode INTEGER,
    session_hash TEXT UNIQUE, joined_at REAL, last_seen REAL, left_at REAL,
    state TEXT, reason TEXT, tokens_per_second REAL DEFAULT 0, loss REAL,
    tokens_contributed INTEGER DEFAULT 0, bytes_sent INTEGER DEFAULT 0, eligible_round INTEGER DEFAULT 0,
    active_since REAL, quarantined_at REAL, quarantine_reason TEXT,
    secret_hash TEXT);  -- proves the worker in a later Join (its session expired or was revoked)
CREATE TABLE IF NOT EXISTS shards (
    idx INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, tokens INTEGER NOT NULL,
    rank INTEGER NOT NULL DEFAULT 0,  -- lease order within the epoch (a seeded shuffle per epoch)
    epoch INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'pending',  -- pending | leased | done
    done_round INTEGER, done_by TEXT, times_done INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY, shard_idx INTEGER NOT NULL, worker_id TEXT NOT NULL, epoch INTEGER NOT NULL,
    round INTEGER NOT NULL, granted_at REAL NOT NULL, deadline REAL NOT NULL,
    state TEXT NOT NULL,  -- active | trained | done | expired | released
    tokens INTEGER, loss REAL, closed_at REAL,
    credited INTEGER NOT NULL DEFAULT 0,  -- of its tokens, how many included contributions were credited with
    claimed INTEGER NOT NULL DEFAULT 0, claim_round INTEGER,  -- tokens its worker trained on it in claim_round
    done_round INTEGER, reported_at REAL);
CREATE INDEX IF NOT EXISTS leases_active ON leases (state, deadline);
CREATE INDEX IF NOT EXISTS leases_worker ON leases (worker_id, state);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, started_at REAL, ended_at REAL,
    state TEXT NOT NULL,  -- training | averaging | done | failed | rejected
    tokens INTEGER DEFAULT 0, contributors INTEGER DEFAULT 0, theta_hash TEXT, loss REAL, val_loss REAL,
    averaging_seconds REAL, bytes_sent INTEGER, detail TEXT, group_size INTEGER,
    left_out REAL);  -- the fraction of the members' values the robust rule left out of the average
CREATE TABLE IF NOT EXISTS contributions (
    round INTEGER NOT NULL, worker_id TEXT NOT NULL, tokens INTEGER NOT NULL DEFAULT 0,
    included INTEGER, reason TEXT, flagged INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (round, worker_id));
CREATE TABLE IF NOT EXISTS refusals (
    worker_id TEXT NOT NULL, kind TEXT NOT NULL, n INTEGER NOT NULL, last_at REAL, last_detail TEXT,
    PRIMARY KEY (worker_id, kind));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, worker_id TEXT, detail TEXT);
"""
# ledgers made before SCHEMA_VERSION 4 lack these columns
MIGRATIONS = ["ALTER TABLE workers ADD COLUMN active_since REAL",
              "ALTER TABLE leases ADD COLUMN credited INTEGER NOT NULL DEFAULT 0",
              "ALTER TABLE leases ADD COLUMN done_round INTEGER",
              "ALTER TABLE leases ADD COLUMN claimed INTEGER NOT NULL DEFAULT 0",
              "ALTER TABLE leases ADD COLUMN claim_round INTEGER",
              "ALTER TABLE leases ADD COLUMN reported_at REAL",
              "ALTER TABLE rounds ADD COLUMN group_size INTEGER",
              "ALTER TABLE workers ADD COLUMN quarantined_at REAL",
              "ALTER TABLE workers ADD COLUMN quarantine_reason TEXT",
              "ALTER TABLE contributions ADD COLUMN flagged INTEGER NOT NULL DEFAULT 0",
              "ALTER TABLE workers ADD COLUMN secret_hash TEXT",
              "UPDATE leases SET state = 'done', credited = tokens WHERE state = 'reported'",
              "ALTER TABLE rounds ADD COLUMN left_out REAL"]

ONLINE_HEARTBEATS = 3  # a worker is online while its last heartbeat is this many intervals old at most,
ONLINE_SLACK = 5.0  # plus this many seconds
EVENT_EVERY = 60.0  # seconds between two events of the same refusal kind for the same worker
MAX_SOURCES = 10_000  # network sources counted one by one in `refusals`; more are counted together
STRANGERS = "ip:many"  # ... under this name
OPEN = ("active", "trained")  # lease states that hold a shard


def digest(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


class Ledger:
    """lease_seconds: how long a lease lives without a heartbeat; heartbeat_interval: how often
    workers beat (it defines who is online); max_leases: active leases a worker may hold at once;
    max_tokens_per_second: the fastest a worker could possibly train (claims beyond are clamped);
    quarantine_after, quarantine_window: a worker whose contribution was flagged in this many of
    the last quarantine_window rounds it took part in is quarantined; clock: time source (tests pass
    a fake one)."""

    def __init__(self, path, *, lease_seconds, heartbeat_interval, max_leases=2, max_tokens_per_second=float("inf"),
                 quarantine_after=2, quarantine_window=5, clock=time.time):
        self.path = str(path)
        self.lease_seconds = lease_seconds
        self.heartbeat_interval = heartbeat_interval
        self.max_leases = max_leases
        self.quarantine_after, self.quarantine_window = quarantine_after, quarantine_window
        self.max_tokens_per_second = max_tokens_per_second
        self.clock = clock
        self.lock = threading.RLock()
        self._last_event = {}  # (worker_id, kind) -> when its last refusal event was written
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self):
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        existing = self.db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'workers'").fetchone()[0]
        if existing and version < SCHEMA_VERSION:
            for sql in MIGRATIONS:
                with contextlib.suppress(sqlite3.OperationalError):  # a column that is already there
                    self.db.execute(sql)
        self.db.executescript(SCHEMA)
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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

    # --- meta, events, refusals ---

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

    def refuse(self, kind, detail, worker_id="", db=None):
        """Count a refused or clamped claim (worker_id "" for a peer the ledger does not know) and
        write it as a `refused` event, at most once a minute per worker and kind."""
        if db is None:
            with self.tx() as db:
                return self.refuse(kind, detail, worker_id, db)
        now = self.clock()
        detail = detail[:300]
        if len(self._last_event) > MAX_SOURCES:
            self._last_event.clear()
        db.execute("INSERT INTO refusals (worker_id, kind, n, last_at, last_detail) VALUES (?, ?, 1, ?, ?) "
                   "ON CONFLICT (worker_id, kind) DO UPDATE SET n = n + 1, last_at = excluded.last_at, "
                   "last_detail = excluded.last_detail", (worker_id, kind, now, detail))
        key = (worker_id, kind)
        if now - self._last_event.get(key, float("-inf")) >= EVENT_EVERY:
            self._last_event[key] = now
            self.event("refused", f"{kind}: {detail}", worker_id or None, db)

    def refuse_source(self, kind, detail, source):
        """Count a refusal of a stranger (no session) by the network it came from (limits.source_of),
        without a row per refusal: one per source and kind, and past MAX_SOURCES sources one for all
        of them. Its event (at most once a minute per kind, for all strangers together) says what
        was refused, never what the stranger sent."""
        with self.tx() as db:
            known = db.execute("SELECT 1 FROM refusals WHERE worker_id = ? AND kind = ?", (source, kind)).fetchone()
            if known is None and db.execute("SELECT COUNT(*) FROM refusals WHERE worker_id LIKE 'ip:%'"
                                            ).fetchone()[0] >= MAX_SOURCES:
                source = STRANGERS
            now = self.clock()
            db.execute("INSERT INTO refusals (worker_id, kind, n, last_at, last_detail) VALUES (?, ?, 1, ?, ?) "
                       "ON CONFLICT (worker_id, kind) DO UPDATE SET n = n + 1, last_at = excluded.last_at, "
                       "last_detail = excluded.last_detail", (source, kind, now, detail[:300]))
            if now - self._last_event.get(("", kind), float("-inf")) >= EVENT_EVERY:
                self._last_event[("", kind)] = now
                n = db.execute("SELECT SUM(n) FROM refusals WHERE kind = ? AND worker_id LIKE 'ip:%'",
                               (kind,)).fetchone()[0]
                self.event("refused", f"{kind}: {detail[:200]} ({n} so far from strangers)", None, db)

    def refusal_counts(self):
        """{kind: times refused}, over all workers and strangers."""
        return {r["kind"]: r["n"] for r in self.query("SELECT kind, SUM(n) AS n FROM refusals GROUP BY kind")}

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

    def add_worker(self, *, name, device, peer_id, current_round, round_started):
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
                       "VALUES (?, ?, ?, ?, 1, ?, ?, ?, 'joining', '', ?, ?, ?)",
                       (worker_id, name, device, peer_id, digest(session), now, now, eligible, now, digest(secret)))
            self.event("join", f"{name} ({device})", worker_id, db)
        return worker_id, session, secret

    def resume_worker(self, worker_id, secret, *, peer_id, current_round, round_started):
        """A new session for a worker this ledger knows, if secret is its own; else None. Like a
        new worker, it waits for the next round if this one is under way; peer_id must be free."""
        row = self.worker(worker_id)
        if row is None or not row["secret_hash"] or not hmac.compare_digest(row["secret_hash"], digest(secret)):
            return None
        session = secrets.token_urlsafe(24)
        now = self.clock()
        with self.tx() as db:
            db.execute("UPDATE workers SET session_hash = ?, peer_id = ?, left_at = NULL, state = 'joining', "
                       "reason = '', last_seen = ?, eligible_round = ?, active_since = ? WHERE id = ?",
                       (digest(session), peer_id, now, current_round + 1 if round_started else current_round, now,
                        worker_id))
            self.event("rejoin", "back with its worker secret", worker_id, db)
        return session

    def peer_owner(self, peer_id):
        """The id of the worker still in the swarm that registered this hivemind peer id, or None."""
        rows = self.query("SELECT id FROM workers WHERE peer_id = ? AND left_at IS NULL", (peer_id,))
        return rows[0]["id"] if rows else None

    def register_peer(self, worker_id, peer_id):
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

    def worker_for_session(self, session, ttl=float("inf")):
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

    def revoke_sessions(self, why):
        """End every session (token rotation): workers must join again, with the new token."""
        with self.tx() as db:
            n = db.execute("UPDATE workers SET session_hash = NULL WHERE session_hash IS NOT NULL").rowcount
            self.event("sessions_revoked", f"{n} session(s): {why}", None, db)
        return n

    def worker(self, worker_id):
        rows = self.query("SELECT * FROM workers WHERE id = ?", (worker_id,))
        return rows[0] if rows else None

    def come_back(self, worker_id, *, current_round, round_started):
        """A worker that left (or crashed) is back with its session: same identity, same totals;
        like a new worker, it waits for the next round if this one is under way."""
        now = self.clock()
        with self.tx() as db:
            db.execute("UPDATE workers SET left_at = NULL, state = 'joining', reason = '', last_seen = ?, "
                       "eligible_round = ?, active_since = ? WHERE id = ?",
                       (now, current_round + 1 if round_started else current_round, now, worker_id))
            self.event("rejoin", "back with its session", worker_id, db)

    def leave(self, worker_id):
        with self.tx() as db:
            db.execute("UPDATE workers SET left_at = ?, state = 'offline', reason = 'left', session_hash = NULL "
                       "WHERE id = ?", (self.clock(), worker_id))
            n = self._release(db, worker_id, None)
            # what it trained in the round under way leaves with it: its pseudo-gradient is gone
            db.execute("DELETE FROM contributions WHERE worker_id = ? AND included IS NULL AND round IN "
                       "(SELECT round FROM rounds WHERE state = 'training')", (worker_id,))
            self.event("leave", f"returned {n} lease(s)", worker_id, db)

    def quarantine_reason(self, worker_id):
        """Why the worker is quarantined, or None."""
        rows = self.query("SELECT quarantine_reason FROM workers WHERE id = ? AND quarantined_at IS NOT NULL",
                          (worker_id,))
        return rows[0]["quarantine_reason"] if rows else None

    def quarantined_workers(self):
        return self.query("SELECT id, name, quarantined_at, quarantine_reason FROM workers "
                          "WHERE quarantined_at IS NOT NULL ORDER BY quarantined_at")

    def lift_quarantine(self, worker_id):
        """The operator lets a quarantined worker back in (its past flags are forgiven). False if it
        was not quarantined."""
        with self.tx() as db:
            if not db.execute("UPDATE workers SET quarantined_at = NULL, quarantine_reason = NULL WHERE id = ? "
                              "AND quarantined_at IS NOT NULL", (worker_id,)).rowcount:
                return False
            db.execute("UPDATE contributions SET flagged = 0 WHERE worker_id = ?", (worker_id,))
            self.event("quarantine_lifted", "by the operator", worker_id, db)
            return True

    def _quarantine_if_repeated(self, db, worker_id):
        flags = [r[0] for r in db.execute("SELECT flagged FROM contributions WHERE worker_id = ? AND included IS NOT NULL "
                                          "ORDER BY round DESC LIMIT ?", (worker_id, self.quarantine_window))]
        if sum(flags) >= self.quarantine_after:
            reason = (f"contribution flagged in {sum(flags)} of its last {len(flags)} rounds "
                      f"(at most {self.quarantine_after - 1} allowed)")
            if db.execute("UPDATE workers SET quarantined_at = ?, quarantine_reason = ? WHERE id = ? "
                          "AND quarantined_at IS NULL", (self.clock(), reason, worker_id)).rowcount:
                self._release(db, worker_id, None)
                self.event("quarantined", reason, worker_id, db)

    def online_after(self):
        """The one definition of an online worker: it has not left, and its last heartbeat came
        after this time."""
        return self.clock() - (ONLINE_HEARTBEATS * self.heartbeat_interval + ONLINE_SLACK)

    def online_count(self):
        return self.query("SELECT COUNT(*) AS n FROM workers WHERE left_at IS NULL AND last_seen > ?",
                          (self.online_after(),))[0]["n"]

    def swarm_tokens_per_second(self):
        """Sum of the online, training workers' throughput."""
        return self.query("SELECT COALESCE(SUM(tokens_per_second), 0) AS n FROM workers WHERE left_at IS NULL "
                          "AND last_seen > ? AND state = 'training'", (self.online_after(),))[0]["n"]

    def anyone_may_train(self, round_):
        """Is an online worker allowed to train in round round_ (not one that waits for the next)?"""
        return bool(self.query("SELECT 1 FROM workers WHERE left_at IS NULL AND quarantined_at IS NULL "
                               "AND last_seen > ? AND eligible_round <= ? LIMIT 1", (self.online_after(), round_)))

    def anyone_training(self):
        """Is an online worker training right now?"""
        return bool(self.query("SELECT 1 FROM workers WHERE state = 'training' AND last_seen > ? AND left_at IS NULL "
                               "LIMIT 1", (self.online_after(),)))

    def workers_for_status(self, limit, offset=0):
        """One page of workers: online ones first, then by tokens contributed; `online` and their
        refusals set."""
        cutoff = self.online_after()
        rows = self.query("SELECT w.id, w.name, w.device, w.state, w.reason, w.tokens_per_second, "
                          "w.tokens_contributed, w.last_seen, w.left_at, w.joined_at, w.bytes_sent, w.quarantine_reason, "
                          "(w.left_at IS NULL AND COALESCE(w.last_seen, 0) > ?) AS online, "
                          "(SELECT COALESCE(SUM(n), 0) FROM refusals r WHERE r.worker_id = w.id) AS refused, "
                          "(SELECT kind || ': ' || last_detail FROM refusals r WHERE r.worker_id = w.id "
                          " ORDER BY last_at DESC LIMIT 1) AS last_refusal "
                          "FROM workers w ORDER BY online DESC, w.tokens_contributed DESC, w.joined_at LIMIT ? OFFSET ?",
                          (cutoff, limit, offset))
        for w in rows:
            w["online"], w["last_refusal"] = bool(w["online"]), w["last_refusal"] or ""
        return rows

    def worker_counts(self):
        """{"total", "online", "tokens_per_second" (of the online ones), "by_state": {state: n}}, where
        a worker's state is "quarantined", "offline" (left, or no recent heartbeat) or what it last
        reported."""
        cutoff = self.online_after()
        rows = self.query("SELECT CASE WHEN quarantined_at IS NOT NULL THEN 'quarantined' "
                          "WHEN left_at IS NOT NULL OR COALESCE(last_seen, 0) <= ? THEN 'offline' "
                          "ELSE COALESCE(state, 'joining') END AS s, COUNT(*) AS n, "
                          "SUM(CASE WHEN left_at IS NULL AND COALESCE(last_seen, 0) > ? THEN 1 ELSE 0 END) AS online, "
                          "SUM(CASE WHEN left_at IS NULL AND COALESCE(last_seen, 0) > ? THEN tokens_per_second "
                          "ELSE 0 END) AS tps FROM workers GROUP BY s", (cutoff, cutoff, cutoff))
        return {"total": sum(r["n"] for r in rows), "online": sum(r["online"] or 0 for r in rows),
                "tokens_per_second": sum(r["tps"] or 0.0 for r in rows), "by_state": {r["s"]: r["n"] for r in rows}}

    def top_contributors(self, n):
        return self.query("SELECT name, tokens_contributed FROM workers WHERE tokens_contributed > 0 "
                          "ORDER BY tokens_contributed DESC, joined_at LIMIT ?", (n,))

    # --- claims ---

    def _claim(self, db, worker_id, round_, lease_tokens, now):
        """Record a worker's claims {lease_id: tokens trained on it in the current round round_},
        each clamped to what is left of the lease, and their sum to what the worker could have
        trained since the round (or its session) began; the verified tokens of its round."""
        started = db.execute("SELECT started_at FROM rounds WHERE round = ?", (round_,)).fetchone()
        started = started[0] if started else now
        for lid, claimed in lease_tokens.items():
            row = db.execute("SELECT tokens, credited, claimed, claim_round FROM leases WHERE id = ? AND worker_id = ? "
                             "AND (state IN ('active', 'trained') OR closed_at >= ?)",
                             (lid, worker_id, started)).fetchone()
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

    def claim(self, worker_id, round_, lease_tokens):
        """Record the worker's claims for the current round round_ (see _claim); its verified tokens."""
        with self.tx() as db:
            return self._claim(db, worker_id, round_, lease_tokens, self.clock())

    def heartbeat(self, worker_id, *, current_round, round_, lease_tokens, tps, state, reason, lease_ids, bytes_sent,
                  loss):
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
            lost = []
            for lid in lease_ids:
                cur = db.execute("UPDATE leases SET deadline = ? WHERE id = ? AND worker_id = ? "
                                 "AND state IN ('active', 'trained')", (deadline, lid, worker_id))
                if cur.rowcount == 0:
                    lost.append(lid)
        return deadline, lost

    # --- leases ---

    def lease(self, worker_id, round_):
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
            active = db.execute("SELECT COUNT(*) FROM leases WHERE worker_id = ? AND state = 'active'",
                                (worker_id,)).fetchone()[0]
            if active >= self.max_leases:
                self.refuse("lease_cap", f"asked for a lease while holding {active} active ones "
                            f"(at most {self.max_leases})", worker_id, db)
                return f"at most {self.max_leases} active lease(s) per worker: finish or release one first"
            if db.execute("SELECT COUNT(*) FROM shards WHERE state != 'done'").fetchone()[0] == 0:
                epoch = json.loads(db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]) + 1
                db.execute("UPDATE shards SET state = 'pending', epoch = ?", (epoch,))
                self._shuffle(db, epoch)
                self.set_meta("epoch", epoch, db)
                self.event("epoch", f"epoch {epoch} begins", None, db)
            row = db.execute("SELECT * FROM shards WHERE state = 'pending' ORDER BY rank LIMIT 1").fetchone()
            if row is None:
                return "no shards available: all are leased, waiting for reports"
            lease_id = "l-" + secrets.token_hex(8)
            deadline = now + self.lease_seconds
            db.execute("UPDATE shards SET state = 'leased' WHERE idx = ?", (row["idx"],))
            db.execute("INSERT INTO leases (id, shard_idx, worker_id, epoch, round, granted_at, deadline, state, tokens) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?)", (lease_id, row["idx"], worker_id, row["epoch"],
                                                                      round_, now, deadline, row["tokens"]))
            return {"lease_id": lease_id, "shard_index": row["idx"], "sha256": row["sha256"],
                    "tokens": row["tokens"], "deadline": deadline, "epoch": row["epoch"]}

    def finish_leases(self, worker_id, lease_ids, *, current_round, round_, lease_tokens):
        """The worker says it finished training these leases (and claims lease_tokens in round_, as
        in heartbeat). A lease counts as trained only if it is the worker's, active, and what the
        ledger credited and verified on it covers all of its tokens."""
        with self.tx() as db:
            if round_ == current_round and lease_tokens:
                self._claim(db, worker_id, round_, lease_tokens, self.clock())
            for lid in lease_ids:
                row = db.execute("SELECT tokens, credited, claimed, claim_round, state FROM leases "
                                 "WHERE id = ? AND worker_id = ?", (lid, worker_id)).fetchone()
                if row is None or row["state"] != "active":
                    continue  # not its lease, or no longer held: nothing to finish
                claimed = row["claimed"] if row["claim_round"] == current_round else 0
                if row["credited"] + claimed < row["tokens"]:
                    self.refuse("finish_refused", f"said it finished lease {lid[:40]} but claimed only "
                                f"{row['credited'] + claimed} of its {row['tokens']} tokens", worker_id, db)
                    continue
                db.execute("UPDATE leases SET state = 'trained' WHERE id = ?", (lid,))

    def group_members(self, round_, since):
        """The round's averaging group: every worker still in the swarm and not quarantined, with a
        registered peer id, that held a lease since `since` (the round's start) or has verified
        tokens in it, and its weight, the verified tokens. [(worker_id, peer_id, tokens)]"""
        return [(r["id"], r["peer_id"], r["tokens"]) for r in self.query(
            "SELECT w.id, w.peer_id, COALESCE(c.tokens, 0) AS tokens FROM workers w "
            "LEFT JOIN contributions c ON c.worker_id = w.id AND c.round = ? "
            "WHERE w.left_at IS NULL AND w.quarantined_at IS NULL AND w.peer_id IS NOT NULL AND w.peer_id != '' "
            "AND (c.tokens > 0 OR EXISTS ("
            "SELECT 1 FROM leases l WHERE l.worker_id = w.id AND (l.state IN ('active', 'trained') "
            "OR l.closed_at >= ? OR l.granted_at >= ?))) ORDER BY w.id", (round_, since, since))]

    def lease_row(self, lease_id):
        rows = self.query("SELECT * FROM leases WHERE id = ?", (lease_id,))
        return rows[0] if rows else None

    def report(self, worker_id, lease_id, round_, loss):
        """The worker reports a lease it trained in round_. Accepted only if round_'s included
        contribution of this worker covered the lease's tokens (the round's commit then marked it
        done). Returns (accepted, detail); a duplicate or unfounded report changes nothing."""
        with self.tx() as db:
            lease = db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if lease is None or lease["worker_id"] != worker_id:
                self.refuse("report_refused", f"reported lease {lease_id[:40]}, which is not its own", worker_id, db)
                return False, "unknown lease"
            if lease["state"] != "done" or lease["done_round"] != round_:
                self.refuse("report_refused", f"reported lease {lease_id} for round {round_}, whose included "
                            "contribution does not cover it", worker_id, db)
                return False, f"round {round_}'s included contribution does not cover this lease ({lease['state']})"
            if lease["reported_at"] is not None:
                return False, "duplicate report: already counted"
            db.execute("UPDATE leases SET reported_at = ?, loss = ? WHERE id = ?", (self.clock(), loss, lease_id))
            return True, "counted"

    def release(self, worker_id, lease_ids=None):
        with self.tx() as db:
            n = self._release(db, worker_id, lease_ids)
            if n:
                self.event("release", f"returned {n} lease(s)", worker_id, db)
            return n

    def _release(self, db, worker_id, lease_ids):
        rows = db.execute("SELECT id, shard_idx FROM leases WHERE worker_id = ? AND state IN ('active', 'trained')",
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
        rows = db.execute("SELECT id, shard_idx, worker_id FROM leases WHERE state IN ('active', 'trained') "
                          "AND deadline < ?", (now,)).fetchall()
        for r in rows:
            db.execute("UPDATE leases SET state = 'expired', closed_at = ? WHERE id = ?", (now, r["id"]))
            db.execute("UPDATE shards SET state = 'pending' WHERE idx = ? AND state = 'leased'", (r["shard_idx"],))
            self.event("lease_expired", f"shard {r['shard_idx']} back in the queue", r["worker_id"], db)
        return len(rows)

    # --- rounds and contributions ---

    def round_tokens(self, round_):
        return self.query("SELECT COALESCE(SUM(tokens), 0) AS n FROM contributions WHERE round = ?",
                          (round_,))[0]["n"]

    def start_round(self, round_, theta_hash, db=None):
        if db is None:
            with self.tx() as db:
                return self.start_round(round_, theta_hash, db)
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

    def set_round_state(self, round_, state, group_size=None):
        with self.tx() as db:
            db.execute("UPDATE rounds SET state = ?, group_size = COALESCE(?, group_size) WHERE round = ?",
                       (state, group_size, round_))

    def commit_round(self, round_, *, included, excluded, theta_hash, averaging_seconds, flagged=(), loss=None,
                     val_loss=None, bytes_sent=None, left_out=None):
        """Round round_ is done, all at once: included {worker_id: tokens} is credited (the budget,
        each worker's total, and its leases in grant order: a lease whose tokens are all credited is
        done, and so is its shard); excluded {worker_id: reason} gets nothing, and its leases go back;
        those of them in `flagged` count towards quarantine; round_ + 1 starts with theta_hash; left_out:
        the fraction of the members' values the robust rule left out."""
        tokens = sum(included.values())
        now = self.clock()
        with self.tx() as db:
            db.execute("UPDATE rounds SET ended_at = ?, state = 'done', tokens = ?, contributors = ?, "
                       "averaging_seconds = ?, loss = ?, val_loss = ?, bytes_sent = ?, left_out = ? WHERE round = ?",
                       (now, tokens, len(included), averaging_seconds, loss, val_loss, bytes_sent, left_out, round_))
            for wid, t in included.items():
                db.execute("INSERT INTO contributions (round, worker_id, tokens, included, reason) VALUES (?, ?, ?, 1, '') "
                           "ON CONFLICT (round, worker_id) DO UPDATE SET tokens = excluded.tokens, included = 1",
                           (round_, wid, t))
                db.execute("UPDATE workers SET tokens_contributed = tokens_contributed + ? WHERE id = ?", (t, wid))
                self._credit(db, wid, t, round_, now)
            self._exclude(db, round_, excluded, flagged)
            total = json.loads((db.execute("SELECT value FROM meta WHERE key = 'tokens_trained'").fetchone()
                                or ["0"])[0])
            self.set_meta("tokens_trained", total + tokens, db)
            self.start_round(round_ + 1, theta_hash, db)

    def fail_round(self, round_, *, excluded, detail, averaging_seconds=None, state="failed", left_out=None):
        """Round round_ failed (or its result was rejected: state "rejected"): nothing is credited,
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

    def set_val_loss(self, round_, val_loss):
        """The validation loss of round round_'s new theta, evaluated after its commit."""
        with self.tx() as db:
            db.execute("UPDATE rounds SET val_loss = ? WHERE round = ?", (val_loss, round_))

    def reject_late(self, round_, detail, val_loss):
        """A committed round whose evaluation failed the safety gate: rejected after the fact (the
        coordinator rolls back to the theta it started from)."""
        with self.tx() as db:
            db.execute("UPDATE rounds SET state = 'rejected', detail = ?, val_loss = ? WHERE round = ?",
                       (detail[:300], val_loss if math.isfinite(val_loss) else None, round_))
            self.event("round_rejected", f"round {round_}: {detail}", None, db)

    def request_rollback(self, to_round):
        """The operator asks for theta_global to go back to round to_round's (applied by the
        coordinator between rounds, or at its next start)."""
        self.set_meta("rollback_to", to_round)

    def rollback(self, round_, *, to_round, theta_hash, tokens_trained):
        """Apply a requested rollback: round round_ ends without a result, round round_ + 1 starts
        from round to_round's theta (theta_hash), and the budget counts what that theta had trained."""
        detail = f"rolled back to round {to_round}'s theta by the operator"
        with self.tx() as db:
            db.execute("UPDATE rounds SET ended_at = ?, state = 'failed', tokens = 0, contributors = 0, detail = ? "
                       "WHERE round = ?", (self.clock(), detail, round_))
            db.execute("DELETE FROM meta WHERE key = 'rollback_to'")
            self.set_meta("tokens_trained", tokens_trained, db)
            self.event("rollback", detail, None, db)
            self.start_round(round_ + 1, theta_hash, db)

    def _credit(self, db, worker_id, tokens, round_, now):
        """Credit each of the worker's leases with what it claimed on it in round_ (up to `tokens`
        in all, the leases it finished first)."""
        rows = db.execute("SELECT id, shard_idx, tokens, credited, claimed, state FROM leases WHERE worker_id = ? AND "
                          "claim_round = ? AND claimed > 0 ORDER BY state = 'trained' DESC, granted_at, rowid",
                          (worker_id, round_)).fetchall()
        for r in rows:
            add = min(tokens, r["claimed"])
            tokens -= add
            if r["credited"] + add >= r["tokens"] and r["state"] in OPEN:
                db.execute("UPDATE leases SET credited = tokens, claimed = 0, state = 'done', done_round = ?, "
                           "closed_at = ? WHERE id = ?", (round_, now, r["id"]))
                db.execute("UPDATE shards SET state = 'done', done_round = ?, done_by = ?, times_done = times_done + 1 "
                           "WHERE idx = ? AND state = 'leased'", (round_, worker_id, r["shard_idx"]))
            else:
                db.execute("UPDATE leases SET credited = credited + ?, claimed = 0 WHERE id = ?", (add, r["id"]))

    def _exclude(self, db, round_, excluded, flagged=()):
        for wid, reason in excluded.items():
            db.execute("INSERT INTO contributions (round, worker_id, tokens, included, reason, flagged) "
                       "VALUES (?, ?, 0, 0, ?, ?) ON CONFLICT (round, worker_id) DO UPDATE SET included = 0, "
                       "reason = excluded.reason, flagged = excluded.flagged", (round_, wid, reason, int(wid in flagged)))
            self.event("contribution_rejected", f"round {round_}: {reason}", wid, db)
            self._release(db, wid, None)
            if wid in flagged:
                self._quarantine_if_repeated(db, wid)

    def included(self, round_, worker_id):
        rows = self.query("SELECT included FROM contributions WHERE round = ? AND worker_id = ?", (round_, worker_id))
        return bool(rows and rows[0]["included"])

    def round_rows(self, *rounds):
        """{round: its row} for those of `rounds` the ledger knows."""
        marks = ", ".join("?" * len(rounds))
        return {r["round"]: r for r in self.query(f"SELECT * FROM rounds WHERE round IN ({marks})", rounds)}

    def finished_rounds(self, limit, before=None):
        """The last `limit` finished rounds (done, failed or rejected) before round `before` (None:
        the last ones), oldest first."""
        return self.query("SELECT round, started_at, ended_at, state, tokens, contributors, loss, val_loss, "
                          "averaging_seconds, bytes_sent, detail, left_out FROM rounds WHERE state IN ('done', 'failed', 'rejected') "
                          "AND round < ? ORDER BY round DESC LIMIT ?", (1 << 62 if before is None else before, limit))[::-1]

    def recent_val_losses(self, limit):
        """The validation losses of the last `limit` evaluated rounds, committed or rejected."""
        return [r["val_loss"] for r in self.query("SELECT val_loss FROM rounds WHERE state IN ('done', 'rejected') "
                                                  "AND val_loss IS NOT NULL ORDER BY round DESC LIMIT ?", (limit,))]

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

"""The ledger's schema, the one place that spells its tables: SCHEMA creates them on a new ledger, and
MIGRATIONS bring a ledger made before SCHEMA_VERSION up to it (see Store._migrate). The states in the
comments are gptswarm/states.py's."""

SCHEMA_VERSION = 6
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, device TEXT, peer_id TEXT, client_mode INTEGER,
    session_hash TEXT UNIQUE, joined_at REAL, last_seen REAL, left_at REAL,
    state TEXT, reason TEXT, tokens_per_second REAL DEFAULT 0, loss REAL,
    tokens_contributed INTEGER DEFAULT 0, bytes_sent INTEGER DEFAULT 0, eligible_round INTEGER DEFAULT 0,
    active_since REAL, quarantined_at REAL, quarantine_reason TEXT,
    secret_hash TEXT,  -- proves the worker in a later Join (its session expired or was revoked)
    tokens_credited INTEGER NOT NULL DEFAULT 0,  -- of tokens_contributed, what its scores credited (scoring.py)
    tokens_verified INTEGER NOT NULL DEFAULT 0);  -- of tokens_credited, what passed a replay (rounds/replay.py)
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
    included INTEGER, reason TEXT, flagged INTEGER NOT NULL DEFAULT 0,
    credited INTEGER,  -- of its tokens, what its score credited (coordinator/scoring.py)
    score REAL, score_leased REAL, score_off REAL,  -- the round's ratio to the median member; loss decrease per token
    standing REAL,  -- the mean of its last ratios, this one included
    verified INTEGER,  -- its credit, once a replay of it passed (NULL: not replayed)
    PRIMARY KEY (round, worker_id));
CREATE TABLE IF NOT EXISTS replays (  -- contributions drawn for a replay (coordinator/replays.py)
    round INTEGER NOT NULL, worker_id TEXT NOT NULL, commit_hash TEXT NOT NULL,
    state TEXT NOT NULL,  -- requested | uploaded | passed | failed | unanswered | lost
    requested_at REAL NOT NULL, deadline REAL NOT NULL, ended_at REAL,
    distance REAL, seconds REAL, detail TEXT,  -- |sent - replayed| / |replayed| on the sample; the replay's CPU time
    PRIMARY KEY (round, worker_id));
CREATE INDEX IF NOT EXISTS replays_open ON replays (state, worker_id);
CREATE TABLE IF NOT EXISTS refusals (
    worker_id TEXT NOT NULL, kind TEXT NOT NULL, n INTEGER NOT NULL, last_at REAL, last_detail TEXT,
    PRIMARY KEY (worker_id, kind));
CREATE TABLE IF NOT EXISTS reducers (  -- the operator's reducer nodes: a credential each (gptswarm reducer-credential)
    name TEXT PRIMARY KEY, credential_hash TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, worker_id TEXT, detail TEXT);
"""
# ledgers made before SCHEMA_VERSION lack these columns
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
              "ALTER TABLE rounds ADD COLUMN left_out REAL",
              # version 5: scores and credit
              "ALTER TABLE workers ADD COLUMN tokens_credited INTEGER NOT NULL DEFAULT 0",
              "UPDATE workers SET tokens_credited = tokens_contributed",
              "ALTER TABLE contributions ADD COLUMN credited INTEGER",
              "ALTER TABLE contributions ADD COLUMN score REAL",
              "ALTER TABLE contributions ADD COLUMN score_leased REAL",
              "ALTER TABLE contributions ADD COLUMN score_off REAL",
              "ALTER TABLE contributions ADD COLUMN standing REAL",
              # version 6: replays
              "ALTER TABLE workers ADD COLUMN tokens_verified INTEGER NOT NULL DEFAULT 0",
              "ALTER TABLE contributions ADD COLUMN verified INTEGER"]

"""The base of the ledger: its one SQLite connection and the lock around it. Every read is one `query`,
every change one `tx` (BEGIN IMMEDIATE ... COMMIT), so a coordinator killed at any moment restarts with a
consistent ledger; the parts (events, leases, workers, rounds, views) use nothing else of it."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

from .schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION

Row = dict[str, Any]  # one row as query() returns it, {column: value}


class Store:
    """The connection to the ledger at `path`: read-write (the schema created or migrated), or
    readonly on an existing ledger (mode=ro: nothing can write through it, and it needs no running
    coordinator); clock: time source (tests pass a fake one).

    Threads: any (gRPC, HTTP, the round loop, the gate); the connection and every field the parts
    change after construction (the refusal events' times) are used only under self.lock, which
    every `query` and `tx` holds for its whole length."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
                 readonly: bool = False) -> None:
        self.path = str(path)
        self.clock = clock
        self.lock = threading.RLock()
        if readonly:
            self.db = sqlite3.connect(Path(self.path).absolute().as_uri() + "?mode=ro", uri=True,
                                      check_same_thread=False, isolation_level=None, timeout=5)
            self.db.row_factory = sqlite3.Row
            return
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        existing = self.db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'workers'").fetchone()[0]
        if existing and version < SCHEMA_VERSION:
            for sql in MIGRATIONS:
                with contextlib.suppress(sqlite3.OperationalError):  # a column that is already there
                    self.db.execute(sql)
        self.db.executescript(SCHEMA)
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) under the ledger lock; yields the connection."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        with self.lock:
            return [dict(r) for r in self.db.execute(sql, args).fetchall()]

    # --- meta: the run's counters (round, epoch, tokens_trained, rollback_to), as JSON ---

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_meta(self, key: str, value: Any, db: sqlite3.Connection | None = None) -> None:
        sql, args = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value))
        if db is not None:
            db.execute(sql, args)
        else:
            with self.tx() as tx:
                tx.execute(sql, args)

"""The ledger's events (what happened, for the status page and the metrics) and refusals.

A refused or clamped claim is counted per worker and kind (`refusals`) and written as an event,
at most once a minute per worker and kind.
"""

from __future__ import annotations

import sqlite3

from .store import Row, Store

EVENT_EVERY = 60.0  # seconds between two events of the same refusal kind for the same worker
MAX_SOURCES = 10_000  # network sources counted one by one in `refusals`; more are counted together
STRANGERS = "ip:many"  # ... under this name


class EventLog(Store):
    _last_event: dict[tuple[str, str], float]  # (worker_id, kind) -> when its last refusal event was written

    def event(self, kind: str, detail: str = "", worker_id: str | None = None,
              db: sqlite3.Connection | None = None) -> None:
        args = (self.clock(), kind, worker_id, detail)
        if db is not None:
            db.execute("INSERT INTO events (at, kind, worker_id, detail) VALUES (?, ?, ?, ?)", args)
        else:
            with self.tx() as tx:
                tx.execute("INSERT INTO events (at, kind, worker_id, detail) VALUES (?, ?, ?, ?)", args)

    def refuse(self, kind: str, detail: str, worker_id: str = "", db: sqlite3.Connection | None = None) -> None:
        """Count a refused or clamped claim (worker_id "" for a peer the ledger does not know) and
        write it as a `refused` event, at most once a minute per worker and kind."""
        if db is None:
            with self.tx() as tx:
                self.refuse(kind, detail, worker_id, tx)
            return
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

    def refuse_source(self, kind: str, detail: str, source: str) -> None:
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

    def refusal_counts(self) -> dict[str, int]:
        """{kind: times refused}, over all workers and strangers."""
        return {r["kind"]: r["n"] for r in self.query("SELECT kind, SUM(n) AS n FROM refusals GROUP BY kind")}

    def recent_events(self, limit: int) -> list[Row]:
        """The last `limit` events, newest first, with the worker's name."""
        return self.query("SELECT e.at, e.kind, e.detail, w.name FROM events e LEFT JOIN workers w ON "
                          "w.id = e.worker_id ORDER BY e.id DESC LIMIT ?", (limit,))

    def count_events(self, kind: str, since: float = 0.0) -> int:
        return self.query("SELECT COUNT(*) AS n FROM events WHERE kind = ? AND at > ?", (kind, since))[0]["n"]

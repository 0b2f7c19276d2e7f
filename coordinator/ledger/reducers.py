"""The operator's reducer nodes' credentials: made on the coordinator's machine (`gptswarm
reducer-credential`), kept as hashes, checked when a reducer registers. A reducer's live state (its
session, peer id, rounds) is the coordinator's, in memory (coordinator/reducers.py)."""

from __future__ import annotations

import hmac

from .events import EventLog
from .store import Store
from .workers import digest


class ReducerBook(EventLog, Store):
    def add_reducer(self, name: str, credential: str) -> None:
        """A new credential for the reducer `name` (a reducer of that name gets a new one: the old one
        stops working)."""
        with self.tx() as db:
            db.execute("INSERT INTO reducers (name, credential_hash, created_at) VALUES (?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET credential_hash = excluded.credential_hash, "
                       "created_at = excluded.created_at, revoked_at = NULL", (name, digest(credential), self.clock()))
        self.event("reducer_credential", f"a credential for reducer node {name!r} was made")

    def revoke_reducer(self, name: str) -> bool:
        with self.tx() as db:
            n = db.execute("UPDATE reducers SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                           (self.clock(), name)).rowcount
        if n:
            self.event("reducer_revoked", f"reducer node {name!r}'s credential was revoked")
        return bool(n)

    def reducer_credential_ok(self, name: str, credential: str) -> bool:
        rows = self.query("SELECT credential_hash FROM reducers WHERE name = ? AND revoked_at IS NULL", (name,))
        return bool(rows) and hmac.compare_digest(rows[0]["credential_hash"], digest(credential))

    def reducer_names(self) -> list[dict]:
        return self.query("SELECT name, created_at, revoked_at FROM reducers ORDER BY name")

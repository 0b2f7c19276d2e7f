"""Read-only questions to the ledger: who is online, the status page's and the metrics' figures, and
a run's figures for the benchmarks. LedgerView asks them of a ledger without its coordinator."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from gptswarm.states import RoundState, ShardState, WorkerState

from ..config import CoordinatorConfig
from .store import Row, Store

ONLINE_HEARTBEATS = 3  # a worker is online while its last heartbeat is this many intervals old at most,
ONLINE_SLACK = 5.0  # plus this many seconds
FINISHED = (RoundState.DONE, RoundState.FAILED, RoundState.REJECTED)  # round states that end a round
EVALUATED = (RoundState.DONE, RoundState.REJECTED)  # ... of a round whose theta was evaluated


class Views(Store):
    heartbeat_interval: float  # how often workers beat (it defines who is online)

    # --- workers ---

    def online_after(self) -> float:
        """The one definition of an online worker: it has not left, and its last heartbeat came
        after this time."""
        return self.clock() - (ONLINE_HEARTBEATS * self.heartbeat_interval + ONLINE_SLACK)

    def workers_for_status(self, limit: int, offset: int = 0) -> list[Row]:
        """One page of workers: online ones first, then by tokens credited; `online`, their refusals
        and their last score and standing (coordinator/scoring.py) set."""
        cutoff = self.online_after()
        rows = self.query("SELECT w.id, w.name, w.device, w.state, w.reason, w.tokens_per_second, "
                          "w.tokens_contributed, w.tokens_credited, w.tokens_verified, w.last_seen, w.left_at, w.joined_at, w.bytes_sent, "
                          "w.quarantine_reason, "
                          "(SELECT c.score FROM contributions c WHERE c.worker_id = w.id AND c.score IS NOT NULL "
                          " ORDER BY c.round DESC LIMIT 1) AS score, "
                          "(SELECT c.standing FROM contributions c WHERE c.worker_id = w.id AND c.standing IS NOT NULL "
                          " ORDER BY c.round DESC LIMIT 1) AS standing, "
                          "(w.left_at IS NULL AND COALESCE(w.last_seen, 0) > ?) AS online, "
                          "(SELECT COALESCE(SUM(n), 0) FROM refusals r WHERE r.worker_id = w.id) AS refused, "
                          "(SELECT kind || ': ' || last_detail FROM refusals r WHERE r.worker_id = w.id "
                          " ORDER BY last_at DESC LIMIT 1) AS last_refusal "
                          "FROM workers w ORDER BY online DESC, w.tokens_credited DESC, w.joined_at LIMIT ? OFFSET ?",
                          (cutoff, limit, offset))
        for w in rows:
            w["online"], w["last_refusal"] = bool(w["online"]), w["last_refusal"] or ""
        return rows

    def worker_counts(self) -> dict[str, Any]:
        """{"total", "online", "tokens_per_second" (of the online ones), "by_state": {state: n}}, where
        a worker's state is "quarantined", "offline" (left, or no recent heartbeat) or what it last
        reported."""
        cutoff = self.online_after()
        rows = self.query("SELECT CASE WHEN quarantined_at IS NOT NULL THEN ? "
                          "WHEN left_at IS NOT NULL OR COALESCE(last_seen, 0) <= ? THEN ? "
                          "ELSE COALESCE(state, ?) END AS s, COUNT(*) AS n, "
                          "SUM(CASE WHEN left_at IS NULL AND COALESCE(last_seen, 0) > ? THEN 1 ELSE 0 END) AS online, "
                          "SUM(CASE WHEN left_at IS NULL AND COALESCE(last_seen, 0) > ? THEN tokens_per_second "
                          "ELSE 0 END) AS tps FROM workers GROUP BY s",
                          (WorkerState.QUARANTINED, cutoff, WorkerState.OFFLINE, WorkerState.JOINING, cutoff, cutoff))
        return {"total": sum(r["n"] for r in rows), "online": sum(r["online"] or 0 for r in rows),
                "tokens_per_second": sum(r["tps"] or 0.0 for r in rows), "by_state": {r["s"]: r["n"] for r in rows}}

    def top_contributors(self, n: int) -> list[Row]:
        """The leaderboard: by credited tokens (what their scores credited of what they contributed)."""
        return self.query("SELECT name, tokens_contributed, tokens_credited, tokens_verified FROM workers "
                          "WHERE tokens_contributed > 0 "
                          "ORDER BY tokens_credited DESC, joined_at LIMIT ?", (n,))

    def credit_table(self) -> list[Row]:
        """Every worker's credit, for the operator to publish (`gptswarm credits`): claimed tokens that
        rounds included, what their scores credited, rounds included and flagged, the standing."""
        return self.query(
            "SELECT w.id, w.name, w.tokens_contributed, w.tokens_credited, w.tokens_verified, "
            "(SELECT COUNT(*) FROM replays r WHERE r.worker_id = w.id AND r.state = 'passed') AS replays_passed, "
            "(SELECT COUNT(*) FROM replays r WHERE r.worker_id = w.id AND r.state = 'failed') AS replays_failed, "
            "(SELECT COUNT(*) FROM contributions c WHERE c.worker_id = w.id AND c.included = 1) AS rounds_included, "
            "(SELECT COUNT(*) FROM contributions c WHERE c.worker_id = w.id AND c.flagged = 1) AS rounds_flagged, "
            "(SELECT c.standing FROM contributions c WHERE c.worker_id = w.id AND c.standing IS NOT NULL "
            " ORDER BY c.round DESC LIMIT 1) AS standing, "
            "w.quarantined_at, w.joined_at "
            "FROM workers w ORDER BY w.tokens_credited DESC, w.joined_at")

    def quarantined_workers(self) -> list[Row]:
        return self.query("SELECT id, name, quarantined_at, quarantine_reason FROM workers "
                          "WHERE quarantined_at IS NOT NULL ORDER BY quarantined_at")

    def shard_counts(self) -> dict[str, int]:
        rows = self.query("SELECT state, COUNT(*) AS n FROM shards GROUP BY state")
        counts: dict[str, int] = {ShardState.PENDING: 0, ShardState.LEASED: 0, ShardState.DONE: 0}
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    # --- rounds ---

    def round_rows(self, *rounds: int) -> dict[int, Row]:
        """{round: its row} for those of `rounds` the ledger knows."""
        marks = ", ".join("?" * len(rounds))
        return {r["round"]: r for r in self.query(f"SELECT * FROM rounds WHERE round IN ({marks})", rounds)}

    def finished_rounds(self, limit: int, before: int | None = None) -> list[Row]:
        """The last `limit` finished rounds (done, failed or rejected) before round `before` (None:
        the last ones), oldest first."""
        return self.query("SELECT round, started_at, ended_at, state, tokens, contributors, loss, val_loss, "
                          "averaging_seconds, bytes_sent, detail, left_out FROM rounds WHERE state IN (?, ?, ?) "
                          "AND round < ? ORDER BY round DESC LIMIT ?",
                          (*FINISHED, 1 << 62 if before is None else before, limit))[::-1]

    def recent_val_losses(self, limit: int) -> list[float]:
        """The validation losses of the last `limit` evaluated rounds, committed or rejected."""
        return [r["val_loss"] for r in self.query("SELECT val_loss FROM rounds WHERE state IN (?, ?) "
                                                  "AND val_loss IS NOT NULL ORDER BY round DESC LIMIT ?",
                                                  (*EVALUATED, limit))]

    def round_counts(self) -> dict[str, int]:
        """{state: number of rounds}."""
        return {r["state"]: r["n"] for r in self.query("SELECT state, COUNT(*) AS n FROM rounds GROUP BY state")}

    def averaging_totals(self) -> dict[str, float]:
        """Bytes the coordinator and the workers sent for averaging, and seconds spent averaging."""
        rounds = self.query("SELECT COALESCE(SUM(bytes_sent), 0) AS b, COALESCE(SUM(averaging_seconds), 0) AS s "
                            "FROM rounds")[0]
        workers = self.query("SELECT COALESCE(SUM(bytes_sent), 0) AS b FROM workers")[0]
        return {"coordinator_bytes": rounds["b"], "worker_bytes": workers["b"], "seconds": rounds["s"]}

    # --- a run's figures (bench/scale.py, bench/swarm.py) ---

    def done_rounds(self) -> list[Row]:
        """The committed rounds, in order: round, tokens, val_loss, ended_at."""
        return self.query("SELECT round, tokens, val_loss, ended_at FROM rounds WHERE state = ? ORDER BY round",
                          (RoundState.DONE,))

    def round_timings(self) -> dict[int, tuple[float, int | None]]:
        """{round: (seconds from its start to its commit, bytes the coordinator sent averaging it)}, of
        the committed rounds."""
        return {r["round"]: (r["seconds"], r["bytes_sent"]) for r in self.query(
            "SELECT round, ended_at - started_at AS seconds, bytes_sent FROM rounds WHERE state = ?",
            (RoundState.DONE,))}

    def done_round_means(self) -> tuple[float | None, float | None]:
        """The committed rounds' mean length and mean averaging time, in seconds (None if there are none)."""
        r = self.query("SELECT AVG(ended_at - started_at) AS seconds, AVG(averaging_seconds) AS averaging_seconds "
                       "FROM rounds WHERE state = ?", (RoundState.DONE,))[0]
        return r["seconds"], r["averaging_seconds"]

    def incomplete_rounds(self, first: int, last: int) -> int:
        """How many of the rounds first..last (both included) failed or were rejected."""
        return self.query("SELECT COUNT(*) AS n FROM rounds WHERE state IN (?, ?) AND round BETWEEN ? AND ?",
                          (RoundState.FAILED, RoundState.REJECTED, first, last))[0]["n"]

    def contributions_total(self) -> int:
        """Included contributions, over the committed rounds (their contributors, summed)."""
        return self.query("SELECT COALESCE(SUM(contributors), 0) AS n FROM rounds WHERE state = ?",
                          (RoundState.DONE,))[0]["n"]

    def bytes_sent_by_workers(self) -> list[Row]:
        """Each worker's name and the bytes its averaging messages came to (as its heartbeats said), by name."""
        return self.query("SELECT name, bytes_sent FROM workers ORDER BY name")

    def contributions_by_name(self) -> dict[str, dict[str, int]]:
        """{worker name: {"judged": its contributions the round's rule included or excluded, "flagged": those of
        them it flagged}}, over the workers with a contribution."""
        return {r["name"]: {"judged": r["judged"], "flagged": r["flagged"]} for r in self.query(
            "SELECT w.name, SUM(c.included IS NOT NULL) AS judged, SUM(c.flagged) AS flagged FROM contributions c "
            "JOIN workers w ON w.id = c.worker_id GROUP BY w.name")}


class LedgerView(Views):
    """The ledger at `path`, read-only and without its coordinator (a finished run's, or a running
    one's from beside it): only the views. heartbeat_interval: the coordinator's (who is online)."""

    def __init__(self, path: str | os.PathLike[str], *,
                 heartbeat_interval: float = CoordinatorConfig.heartbeat_interval,
                 clock: Callable[[], float] = time.time) -> None:
        self.heartbeat_interval = heartbeat_interval
        super().__init__(path, clock=clock, readonly=True)

"""The operator's reducer nodes, as the coordinator sees them (docs/architecture.md "Scale").

A reducer node (`gptswarm reducer --join`) registers with a credential of its own, made on the
coordinator's machine (`gptswarm reducer-credential`); the swarm token and a worker's session are
not one, so no volunteer can become a reducer. The nodes heard from lately, less any that failed
the last round, reduce the next round: its group names them in order, each an equal fraction of
every tensor. The coordinator sends zeros of weight 0 and receives the average like a member
(averaging.RoundContributor), waits for every node's report of its parts, and sums them
(rounds/reports.py): a member is flagged, or left out, on its whole contribution. A node that does
not report, or reports a failure, fails the round and is left out of the next group.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gptswarm.coordinator.ledger import Ledger, digest
from gptswarm.rounds.averaging import Group, Outcome, ReducerNode, RoundContributor
from gptswarm.rounds.reports import merge
from gptswarm.states import ReducerState

log = logging.getLogger("gptswarm.coordinator")
LIVE_SECONDS = 45.0  # a node not heard from for this long is gone (it asks for its next round every <= 30 s)
MAX_NODES = 16  # registered reducer nodes at once (each holds a gRPC thread in its long poll: 64 in all)
REPORT_GRACE = 10.0  # seconds the coordinator waits for reports once its own average is in


@dataclass
class NodeState:
    name: str
    peer_id: str
    maddrs: tuple[str, ...]
    session_hash: str
    registered_at: float
    last_seen: float
    rounds: int = 0  # rounds it reduced that committed or failed for another reason
    failed_round: int = -1  # the last round it failed (it sits out the next one) ...
    failed_at: float = float("-inf")  # ... and every one until it is heard from again
    last_error: str = ""


class ReducerRegistry:
    """Threads: gRPC threads (register, authenticate, report) and the round loop (for_round,
    wait_reports, failed, reduced) and the status page (snapshot) share nodes and reports, under
    self.cond's lock."""

    def __init__(self, ledger: Ledger, clock: Callable[[], float] = time.time):
        self.ledger, self.clock = ledger, clock
        self.cond = threading.Condition()
        self.nodes: dict[str, NodeState] = {}
        self.reports: dict[int, dict[str, tuple[bool, str, str]]] = {}  # round -> name -> (ok, error, report)

    def register(self, name: str, credential: str, peer_id: str, maddrs: list[str]) -> str | None:
        """A new session for the node `name`, if its credential is one the operator made; else None."""
        if not self.ledger.reducer_credential_ok(name, credential):
            return None
        session = secrets.token_urlsafe(32)
        now = self.clock()
        with self.cond:
            if name not in self.nodes and len(self.nodes) >= MAX_NODES:
                return None
            old = self.nodes.get(name)
            self.nodes[name] = NodeState(name, peer_id, tuple(maddrs), digest(session), now, now,
                                         old.rounds if old else 0, old.failed_round if old else -1)
        self.ledger.event("reducer_registered", f"reducer node {name!r} registered as hivemind peer {peer_id}")
        return session

    def authenticate(self, session: str) -> str | None:
        """The name of the node this session belongs to (and it was heard from now), or None."""
        if not session:
            return None
        h = digest(session)
        with self.cond:
            for node in self.nodes.values():
                if secrets.compare_digest(node.session_hash, h):
                    node.last_seen = self.clock()
                    return node.name
        return None

    def for_round(self, r: int) -> tuple[ReducerNode, ...]:
        """The nodes that reduce round r, by name: heard from lately, not failing round r - 1, and heard
        from since they last failed (a node that died is out until it registers or asks again)."""
        now = self.clock()
        with self.cond:
            return tuple(ReducerNode(n.peer_id, n.maddrs, n.name) for n in sorted(self.nodes.values(),
                                                                                    key=lambda n: n.name)
                         if now - n.last_seen < LIVE_SECONDS and n.failed_round < r - 1 and n.last_seen > n.failed_at)

    def report(self, name: str, r: int, ok: bool, error: str, text: str) -> None:
        with self.cond:
            self.reports.setdefault(r, {})[name] = (ok, error[:300], text)
            for old in [k for k in self.reports if k < r - 4]:
                del self.reports[old]
            self.cond.notify_all()

    def wait_reports(self, r: int, names: list[str], timeout: float) -> dict[str, tuple[bool, str, str]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(n in self.reports.get(r, {}) for n in names):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return {n: v for n, v in self.reports.get(r, {}).items() if n in names}

    def failed(self, name: str, r: int, why: str) -> None:
        with self.cond:
            node = self.nodes.get(name)
            if node is not None:
                node.failed_round, node.failed_at, node.last_error = r, self.clock(), why[:300]
        self.ledger.event("reducer_failed", f"round {r}: reducer node {name!r} failed the round: {why}"[:300])
        log.warning("round %d: reducer node %s failed the round: %s", r, name, why)

    def reduced(self, names: list[str]) -> None:
        with self.cond:
            for name in names:
                if name in self.nodes:
                    self.nodes[name].rounds += 1

    def snapshot(self) -> list[dict[str, Any]]:
        """Every registered node, for the status page and /metrics."""
        now = self.clock()
        with self.cond:
            return [{"name": n.name, "peer_id": n.peer_id, "rounds": n.rounds, "failed_round": n.failed_round,
                     "last_error": n.last_error, "seen_seconds_ago": round(now - n.last_seen, 1),
                     "state": ReducerState.OFFLINE if now - n.last_seen >= LIVE_SECONDS else ReducerState.LIVE}
                    for n in sorted(self.nodes.values(), key=lambda n: n.name)]


def reduce_with_nodes(contributor: RoundContributor, registry: ReducerRegistry, group: Group,
                      template: dict[str, torch.Tensor], timeout: float) -> Outcome:
    """The coordinator's part of a round its reducer nodes reduce: its zeros (weight 0) to every
    node, the average back like a member, then every node's report, summed. Never raises."""
    deadline = time.monotonic() + timeout
    names = [n.name for n in group.reducers]
    own = contributor.contribute({k: torch.zeros_like(t) for k, t in template.items()}, group_id=group.group_id,
                                 reducers=[(n.peer_id, list(n.maddrs)) for n in group.reducers], reducer_nodes=True,
                                 weight=0.0, timeout=timeout)
    wait = max(1.0, deadline - time.monotonic()) if own.ok else REPORT_GRACE
    reports = registry.wait_reports(group.round, names, wait)
    # a node is to blame when it sent no report, or failed where another node did not (members that
    # sent nothing, or nothing valid, fail every node alike: that is the round's, not a node's)
    failures = {n: "sent no report of its parts in time" for n in names if n not in reports}
    failed = {n: error or "it failed" for n, (ok, error, _) in reports.items() if not ok}
    blamed = failures if failures else ({} if len(failed) == len(names) else failed)
    for name, why in blamed.items():
        registry.failed(name, group.round, why)
    if failures or failed or not own.ok:
        why = "; ".join(f"reducer node {n}: {w}" for n, w in {**failures, **failed}.items()) or own.error
        return Outcome(False, error=f"the reducer nodes' average did not arrive: {why}"[:300])
    try:
        outcome = merge(group.snapshot(), {n: text for n, (_, _, text) in reports.items()}, own.averaged)
    except (ValueError, KeyError, TypeError) as e:
        return Outcome(False, error=f"a reducer node's report does not read: {type(e).__name__}: {e}"[:300])
    registry.reduced(names)
    return outcome


class ReducerNodes:
    """What the round keeper asks of the reducer nodes: who reduces round r, and a round they reduce."""

    def __init__(self, registry: ReducerRegistry, contributor: RoundContributor, template: dict[str, torch.Tensor]):
        self.registry, self.contributor, self.template = registry, contributor, template

    def for_round(self, r: int) -> tuple[ReducerNode, ...]:
        return self.registry.for_round(r)

    def reduce(self, group: Group, timeout: float) -> Outcome:
        return reduce_with_nodes(self.contributor, self.registry, group, self.template, timeout)

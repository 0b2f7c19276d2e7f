"""Round averaging: every member of a round's group ends with the same bits of the weighted average
of the group's pseudo-gradients.

The coordinator decides each round's group from its ledger (who held leases in the round, with
which registered hivemind peer id, and how many tokens the ledger credits it) and who reduces it:
the coordinator itself, or the operator's reducer nodes, each an equal fraction of every tensor.
RoundReducer runs a reducer's side (the coordinator's, or a node's), RoundContributor a worker's
(and the coordinator's, when nodes reduce: it sends zeros of weight 0 and receives the average). A
worker learns its group id and its reducers' peer ids over gRPC, sends its compressed
pseudo-gradient part by part to them only, and receives the average from them only. The
all-reduce itself is hivemind's, adapted in hivemind_ext.py.
"""

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.p2p import PeerID
from hivemind.utils.asyncio import as_aiter, azip

from gptswarm.rounds import DEFAULT_TOPK
from gptswarm.rounds.hivemind_ext import (
    CODECS,
    AveragingMode,
    RoundServicer,
    SwarmAllReduceRunner,
)
from gptswarm.rounds.p2p import P2PNode
from gptswarm.rounds.robust import History, PartScores, RoundStats

GROUP_ID_BYTES = 32
Tensors = dict[str, torch.Tensor]  # {name: tensor} of the averaged schema
REPLY_GRACE = 2.0  # seconds the reducer waits for its last replies to be counted after its own average


@dataclass(frozen=True)
class ReducerNode:
    """One of the operator's reducer nodes, as a round's group names it."""
    peer_id: str
    maddrs: tuple[str, ...]
    name: str = ""


class Group:
    """A round's averaging group, as the coordinator decided it. A member's weight may still change
    until it asks for the group (RoundReducer.set_weight), never after it started sending.
    reducers: the operator's reducer nodes that reduce it, in order (empty: the coordinator does);
    scales: {peer id: factor} its weight is scaled by in the average (coordinator/scoring.py's
    standing; the ledger still credits the tokens).

    Threads: gRPC threads (a member asking for its place: weigh, ask) and the round loop (snapshot,
    asked_times, final_weights, commits) share members, asked, final and commits, under self.lock; round, group_id,
    reducers and scales never change (set at construction)."""

    def __init__(self, round_: int, members: dict[str, tuple[str, int]], group_id: bytes | None = None,
                 reducers: tuple[ReducerNode, ...] = (), scales: dict[str, float] | None = None):
        self.round = round_
        self.group_id = group_id or secrets.token_bytes(GROUP_ID_BYTES)
        self.reducers = tuple(reducers)
        self.scales = dict(scales or {})  # peer id -> what its weight counts for in the average (its standing)
        self.lock = threading.Lock()
        self._members = dict(members)  # peer id (base58) -> (worker_id, weight)
        self._asked: dict[str, float] = {}  # peer id -> when its member first asked for its place (time.time())
        self._final: set[str] = set()  # peer ids whose weight is final (weighed when their member asked)
        self._commits: dict[str, str] = {}  # peer id -> the sha256 of its member's record of the round (replay.py)

    def member(self, peer_id: str) -> tuple[str, int] | None:
        """(worker_id, weight) of the member with this hivemind peer id, or None."""
        with self.lock:
            return self._members.get(peer_id)

    def snapshot(self) -> dict[str, tuple[str, int]]:
        """{peer id: (worker_id, weight)}, a copy."""
        with self.lock:
            return dict(self._members)

    def weigh(self, peer_id: str, weight: int) -> int:
        """Set a member's final weight; returns its index among the members."""
        with self.lock:
            self._members[peer_id] = (self._members[peer_id][0], weight)
            self._final.add(peer_id)
            return list(self._members).index(peer_id)

    def final_weights(self) -> dict[str, int]:
        """{peer id: weight} of the members whose weight is final."""
        with self.lock:
            return {p: self._members[p][1] for p in self._final}

    def scale(self, peer_id: str) -> float:
        return self.scales.get(peer_id, 1.0)

    def ask(self, peer_id: str, commit: str = "") -> None:
        """Its member asked for its place (committing to its record of the round, if it sent one: the last word counts)."""
        with self.lock:
            self._asked.setdefault(peer_id, time.time())
            if commit:
                self._commits[peer_id] = commit

    def commits(self) -> dict[str, str]:
        """{worker id: the sha256 its member committed to}, a copy."""
        with self.lock:
            return {self._members[p][0]: c for p, c in self._commits.items() if p in self._members}

    def asked_times(self) -> dict[str, float]:
        with self.lock:
            return dict(self._asked)

    def __len__(self) -> int:
        with self.lock:
            return len(self._members)


@dataclass
class Outcome:
    ok: bool
    averaged: dict = field(default_factory=dict)
    included: dict = field(default_factory=dict)  # worker_id -> weight (the reducer's view: who is in the average)
    rejected: dict = field(default_factory=dict)  # worker_id -> reason it was excluded
    lies: dict = field(default_factory=dict)  # worker_id -> what its messages claimed beyond its weight
    scores: dict = field(default_factory=dict)  # worker_id -> robust.PartScores (robust aggregation)
    flagged: set = field(default_factory=set)  # worker_ids whose contribution was invalid or an outlier
    stats: RoundStats | None = None  # what the robust rule did to the round (None: the plain mean)
    bytes_sent: int = 0
    error: str = ""
    invalid: dict = field(default_factory=dict)  # worker_id -> why it is out whatever its scores (not a
    #                                              pseudo-gradient, or not all of it sent): part of rejected
    broken: set = field(default_factory=set)  # of those, the ones that sent what is no pseudo-gradient (flagged)
    bytes_received: int = 0  # the members' messages, as a reducer received them


def judge(members: dict[str, tuple[str, int]], invalid: dict[str, str], broken: set[str],
          scores: dict[str, PartScores]) -> tuple[dict[str, str], set[str], dict[str, int]]:
    """(rejected, flagged, included) of a round from what was out on its own (invalid, broken) and
    the members' part scores over every part (summed over reducer nodes)."""
    rejected, flagged = dict(invalid), set(broken)
    for worker_id, s in scores.items():
        if s.flagged():
            rejected.setdefault(worker_id, f"flagged: {s.summary()}")
            flagged.add(worker_id)
        elif s.mostly_left_out():
            rejected.setdefault(worker_id, f"not in the average: {s.summary()}")
    return rejected, flagged, {w: weight for w, weight in members.values() if w not in rejected}


def _runner(node: P2PNode, tensors: list[torch.Tensor], *, prefix: str, compression: str, topk_fraction: float,
            group_id: bytes, reducers: list[str], senders: list[str], reducers_send: bool, weight: float,
            sender_weights: list[float] | None = None, sender_timeout: float | None = None,
            robust: dict | None = None, codecs: tuple | None = None, probe: Any = None,
            probe_keys: list | None = None) -> SwarmAllReduceRunner:
    """A SwarmAllReduceRunner in which `reducers` (peer ids) reduce equal fractions of every tensor's
    values and `senders` send theirs; reducers_send: the reducers are senders too (the coordinator
    reducing alone, with its own zeros of weight 0), else they only reduce (the operator's reducer
    nodes). codecs: the codec pair (default: the run's, CODECS)."""
    k = len(reducers)
    return SwarmAllReduceRunner(
        p2p=node.p2p, servicer_type=RoundServicer, prefix=prefix, group_id=group_id, tensors=tensors, weight=weight,
        ordered_peer_ids=[PeerID.from_base58(p) for p in [*reducers, *senders]],
        peer_fractions=(1.0,) * k + (0.0,) * len(senders),
        modes=(AveragingMode.NODE if reducers_send else AveragingMode.AUX,) * k + (AveragingMode.CLIENT,) * len(senders),
        sender_weights=sender_weights, robust=robust, codecs=codecs or CODECS[compression](topk_fraction),
        sender_timeout=sender_timeout, max_density=topk_fraction if compression == "topk" else None,
        reducer_timeout=2 * sender_timeout if sender_timeout else None, probe=probe, probe_keys=probe_keys)


class RoundReducer:
    """The reducing side: the coordinator's, reducing every part itself, or a reducer node's, reducing
    its fraction of every part (reduce(..., reducers=...)). node: its P2PNode; template: {name:
    tensor} of the averaged schema; prefix: the run's namespace; compression: a CODECS name
    (topk_fraction: a "topk" run's fraction of values a contribution may have nonzero); aggregation:
    "robust" (robust.py) or "mean" (the weighted mean); sender_timeout: seconds a member may stay
    silent (before it starts, or between parts) before it is excluded; on_refused(peer_id, reason):
    hears of every peer turned away.

    Threads: reduce() runs the round on the node's event loop, which alone touches the runner and
    the history; set_weight hands a weight over to it (call_soon_threadsafe)."""

    def __init__(self, node: P2PNode, template: Tensors, *, prefix: str, compression: str, aggregation: str,
                 sender_timeout: float, on_refused: Callable[[str, str], None],
                 topk_fraction: float = DEFAULT_TOPK, group_wait: float = 0.0) -> None:
        self.node, self.prefix, self.compression, self.topk_fraction = node, prefix, compression, topk_fraction
        self.history = History() if aggregation == "robust" else None
        self.names = list(template)
        self.shapes = {k: template[k].shape for k in self.names}
        self.sender_timeout = sender_timeout
        self.servicer = RoundServicer(on_refused, group_wait)
        node.run(self.servicer.add_p2p_handlers(node.p2p, namespace=prefix))

    def set_weight(self, group: Group, peer_id: str, weight: int) -> None:
        """A member's final weight (before it sends anything); called on a gRPC thread. The running
        all-reduce's copy of the weights is changed on the hivemind loop, which alone reads it."""
        index = group.weigh(peer_id, weight)

        def update() -> None:
            runner = self.servicer.runner
            if runner is not None and runner.group_id == group.group_id:
                runner.sender_weights[1 + index] = self._weight(group, peer_id, weight)
        self.node.loop.call_soon_threadsafe(update)

    def _weight(self, group: Group, peer_id: str, weight: int) -> float:
        """A member's weight in the runner: its tokens, scaled by its standing where the plain mean
        averages (the robust rule judges norms per token and scales in its aggregate alone)."""
        return float(weight) * (1.0 if self.history is not None else group.scale(peer_id))

    def reduce(self, group: Group, timeout: float, *, reducers: list[str] | None = None, coordinator: str = "",
               final_weights: Callable[[], dict[str, int]] | None = None, probe: Any = None) -> Outcome:
        """Average the group's contributions; never raises for network trouble. reducers: the round's
        reducer nodes (peer ids, this node among them), when it is one of them (None: this node is
        the coordinator, reducing every part); coordinator: then the coordinator's peer id (it
        sends zeros of weight 0 and receives the average like a member); final_weights(): then
        {peer id: weight} of the members whose weight is final (asked on a member's first message,
        off the event loop, until its weight is final: it is before the member sends a part); probe:
        coordinator/scoring.py's Probe, which takes every member's dot products as its parts arrive."""
        try:
            return self.node.run(asyncio.wait_for(self._reduce(group, reducers, coordinator, final_weights, probe),
                                                  timeout))
        except asyncio.TimeoutError:
            return Outcome(False, error=f"averaging took longer than {timeout:g} s")
        except Exception as e:
            return Outcome(False, error=f"averaging failed: {type(e).__name__}: {e}"[:300])

    async def _reduce(self, group: Group, reducers: list[str] | None, coordinator: str,
                      final_weights: Callable[[], dict[str, int]] | None, probe: Any = None) -> Outcome:
        members = group.snapshot()  # the weights as they are when the all-reduce starts; set_weight updates the runner's
        peers = list(members)
        if reducers is None:  # the coordinator reduces alone, a sender (of zeros) too
            nodes, senders, nodes_send = [str(self.node.peer_id)], peers, True
        else:  # one of the operator's reducer nodes: the coordinator is a sender, its zeros weigh nothing
            nodes, senders, nodes_send = list(reducers), [coordinator, *peers], False
        tensors = [torch.zeros(self.shapes[k], dtype=torch.float32) for k in self.names]
        scores: dict[str, PartScores] = {}
        robust = stats = None
        if self.history is not None:
            self.history.forget({w for w, _ in members.values()})
            stats = RoundStats()
            robust = dict(keys=[None] + [members[p][0] for p in peers], history=self.history, scores=scores,
                          stats=stats, scales=[1.0] + [group.scale(p) for p in peers])
        runner = _runner(self.node, tensors, prefix=self.prefix, compression=self.compression,
                         topk_fraction=self.topk_fraction, group_id=group.group_id, reducers=nodes, senders=senders,
                         reducers_send=nodes_send, weight=0.0,
                         sender_weights=[0.0] + [self._weight(group, p, members[p][1]) for p in peers],
                         sender_timeout=self.sender_timeout, robust=robust, probe=probe,
                         probe_keys=[None] + [members[p][0] for p in peers])
        self.servicer.admit = None if final_weights is None else _Weights(group, runner, final_weights).admit
        self.servicer.runner = runner
        try:
            async for tensor, averaged in azip(as_aiter(*tensors), runner):
                tensor.copy_(averaged)
            await runner.replies_sent(timeout=REPLY_GRACE)  # so that bytes_sent counts the last replies
        finally:
            self.servicer.runner = self.servicer.admit = None
        if self.history is not None:
            self.history.end_round(scores)
        members = group.snapshot()  # with the final weights of those who asked meanwhile
        invalid, lies, broken = {}, {}, set()
        for peer, reason in runner.rejections:  # not a pseudo-gradient at all: flagged
            if peer in members:  # (on a reducer node, the coordinator's zeros are no member's)
                invalid[members[peer][0]] = reason
                broken.add(members[peer][0])
        for peer, claimed in runner.claimed_weights.items():
            if str(peer) not in members:
                continue
            worker_id, weight = members[str(peer)]
            if claimed > weight:
                lies[worker_id] = f"claimed weight {claimed:g} in round {group.round}'s averaging; the ledger credits {weight}"
        for p in peers:
            worker_id = members[p][0]
            if worker_id not in invalid and not runner.sent_every_part(PeerID.from_base58(p)):
                invalid[worker_id] = "did not send its whole contribution in time"
        rejected, flagged, included = judge(members, invalid, broken, scores)
        if not any(included.values()):
            return Outcome(False, included={}, rejected=rejected, lies=lies, scores=scores, flagged=flagged,
                           stats=stats, bytes_sent=runner.bytes_sent, invalid=invalid, broken=broken,
                           bytes_received=runner.bytes_received, error="no contribution with tokens reached the average")
        return Outcome(True, dict(zip(self.names, tensors)), included, rejected, lies, scores, flagged, stats,
                       runner.bytes_sent, invalid=invalid, broken=broken, bytes_received=runner.bytes_received)

    def shutdown(self) -> None:
        self.node.run(self.servicer.remove_p2p_handlers(self.node.p2p, namespace=self.prefix))


class _Weights:
    """A reducer node's members' final weights, asked of the coordinator (final_weights(), blocking,
    run off the event loop) when a member whose weight is not final yet opens its stream. Threads:
    the node's event loop alone (admit runs there; the question in its executor)."""

    def __init__(self, group: Group, runner: SwarmAllReduceRunner, final_weights: Callable[[], dict[str, int]]):
        self.group, self.runner, self.final_weights = group, runner, final_weights
        self.final: set[str] = set()
        self.lock = asyncio.Lock()

    async def admit(self, peer: PeerID) -> None:
        peer_id = str(peer)
        if peer_id in self.final or self.group.member(peer_id) is None:
            return
        async with self.lock:
            if peer_id in self.final:
                return
            weights = await asyncio.get_event_loop().run_in_executor(None, self.final_weights)
            for p, weight in weights.items():
                if p not in self.final and self.group.member(p) is not None:
                    index = self.group.weigh(p, int(weight))
                    self.runner.sender_weights[1 + index] = float(weight)
                    self.final.add(p)


class RoundContributor:
    """A worker's side. node: its (outgoing-only) P2PNode; template, prefix, compression,
    topk_fraction: as the coordinator's RunConfig says."""

    def __init__(self, node: P2PNode, template: Tensors, *, prefix: str, compression: str,
                 topk_fraction: float = DEFAULT_TOPK) -> None:
        self.node, self.prefix, self.compression, self.topk_fraction = node, prefix, compression, topk_fraction
        self.codecs = CODECS[compression](topk_fraction)  # (what we send in, what the coordinator replies in)
        self.names = list(template)
        self.bytes_sent_total = 0

    def contribute(self, tensors: Tensors, *, group_id: bytes, reducers: list[tuple[str, list[str]]],
                   reducer_nodes: bool, weight: float, timeout: float,
                   give_up: Callable[[], bool] | None = None) -> Outcome:
        """Send `tensors` to the round's reducers ([(peer id, multiaddrs)], as the coordinator said over
        gRPC: the coordinator's own peer, or with reducer_nodes, the operator's reducer nodes, each
        an equal fraction of every tensor) and return the average they send back. Gives up early
        once `give_up()` is true; never raises for network trouble: the Outcome says what happened."""
        local = [tensors[k].detach().to("cpu", torch.float32).clone() for k in self.names]
        for peer_id, maddrs in reducers:
            try:
                self.node.connect(peer_id, maddrs)
            except Exception as e:
                return Outcome(False, error=f"cannot reach the reducer {peer_id[:16]}...: {type(e).__name__}: {e}"[:300])
        runners: list[SwarmAllReduceRunner] = []  # the runner is made on the node's event loop, where its asyncio parts live
        future = asyncio.run_coroutine_threadsafe(
            self._contribute(runners, local, prefix=self.prefix, compression=self.compression,
                             topk_fraction=self.topk_fraction, codecs=self.codecs, group_id=group_id,
                             reducers=[p for p, _ in reducers], senders=[str(self.node.peer_id)],
                             reducers_send=not reducer_nodes, weight=float(weight)), self.node.loop)
        deadline = time.monotonic() + timeout
        while not future.done():
            if (give_up is not None and give_up()) or time.monotonic() > deadline:
                future.cancel()
                sent = self._sent(runners)
                return Outcome(False, bytes_sent=sent,
                               error="gave up: stopping" if time.monotonic() <= deadline
                               else f"averaging took longer than {timeout:g} s")
            time.sleep(0.05)
        sent = self._sent(runners)
        try:
            future.result()
        except Exception as e:
            return Outcome(False, bytes_sent=sent, error=f"averaging failed: {type(e).__name__}: {e}"[:300])
        return Outcome(True, dict(zip(self.names, local)), bytes_sent=sent)

    def _sent(self, runners: list[SwarmAllReduceRunner]) -> int:
        sent = runners[0].bytes_sent if runners else 0
        self.bytes_sent_total += sent
        return sent

    async def _contribute(self, runners: list[SwarmAllReduceRunner], local: list[torch.Tensor], **kwargs: Any) -> None:
        runner = _runner(self.node, local, **kwargs)
        runners.append(runner)
        async for tensor, averaged in azip(as_aiter(*local), runner):
            tensor.copy_(averaged)
        container = runner.tensor_part_container
        if container.failed_size:  # the reducer failed: part of "the average" would be only our own values
            raise RuntimeError(f"lost {container.failed_size / container.total_size:.1%} of the average")

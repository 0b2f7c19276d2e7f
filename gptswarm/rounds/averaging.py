"""Round averaging: every member of a round's group ends with the same bits of the weighted average
of the group's pseudo-gradients.

The coordinator decides each round's group from its ledger (who held leases in the round, with
which registered hivemind peer id, and how many tokens the ledger credits it) and is its only
reducer: RoundReducer runs the coordinator's side, RoundContributor a worker's. A worker learns
its group id and the coordinator's peer id over gRPC, sends its compressed pseudo-gradient part
by part to that peer only, and receives the average from it only. The all-reduce itself is
hivemind's, adapted in hivemind_ext.py.
"""

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.compression import CompressionInfo
from hivemind.p2p import PeerID
from hivemind.utils.asyncio import as_aiter, azip

from gptswarm.rounds import DEFAULT_TOPK
from gptswarm.rounds.codecs import decode
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


class Group:
    """A round's averaging group, as the coordinator decided it. A member's weight may still change
    until it asks for the group (RoundReducer.set_weight), never after it started sending.

    Threads: gRPC threads (a member asking for its place: weigh, ask) and the round loop (snapshot,
    asked_times) share members and asked, under self.lock; round and group_id never change."""

    def __init__(self, round_: int, members: dict[str, tuple[str, int]], group_id: bytes | None = None):
        self.round = round_
        self.group_id = group_id or secrets.token_bytes(GROUP_ID_BYTES)
        self.lock = threading.Lock()
        self._members = dict(members)  # peer id (base58) -> (worker_id, weight)
        self._asked: dict[str, float] = {}  # peer id -> when its member first asked for its place (time.time())

    def member(self, peer_id: str) -> tuple[str, int] | None:
        """(worker_id, weight) of the member with this hivemind peer id, or None."""
        with self.lock:
            return self._members.get(peer_id)

    def snapshot(self) -> dict[str, tuple[str, int]]:
        """{peer id: (worker_id, weight)}, a copy."""
        with self.lock:
            return dict(self._members)

    def weigh(self, peer_id: str, weight: int) -> int:
        """Set a member's weight; returns its index among the members."""
        with self.lock:
            self._members[peer_id] = (self._members[peer_id][0], weight)
            return list(self._members).index(peer_id)

    def ask(self, peer_id: str) -> None:
        with self.lock:
            self._asked.setdefault(peer_id, time.time())

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


def _runner(node: P2PNode, tensors: list[torch.Tensor], *, prefix: str, compression: str, topk_fraction: float,
            group_id: bytes, peer_ids: list[str], weight: float, sender_weights: list[float] | None = None,
            sender_timeout: float | None = None, robust: dict | None = None,
            codecs: tuple | None = None) -> SwarmAllReduceRunner:
    """A SwarmAllReduceRunner in which peer_ids[0] (the coordinator) reduces everything; codecs:
    the codec pair (default: the run's, CODECS)."""
    n = len(peer_ids)
    return SwarmAllReduceRunner(
        p2p=node.p2p, servicer_type=RoundServicer, prefix=prefix, group_id=group_id, tensors=tensors, weight=weight,
        ordered_peer_ids=[PeerID.from_base58(p) for p in peer_ids], peer_fractions=(1.0,) + (0.0,) * (n - 1),
        modes=(AveragingMode.NODE,) + (AveragingMode.CLIENT,) * (n - 1), sender_weights=sender_weights,
        robust=robust, codecs=codecs or CODECS[compression](topk_fraction), sender_timeout=sender_timeout,
        max_density=topk_fraction if compression == "topk" else None,
        reducer_timeout=2 * sender_timeout if sender_timeout else None)


class RoundReducer:
    """The coordinator's side. node: its P2PNode; template: {name: tensor} of the averaged schema;
    prefix: the run's namespace; compression: a CODECS name (topk_fraction: a "topk" run's fraction of
    values a contribution may have nonzero); aggregation: "robust" (robust.py) or
    "mean" (the weighted mean); sender_timeout: seconds a member may stay silent (before it starts,
    or between parts) before it is excluded; on_refused(peer_id, reason): hears of every peer
    turned away."""

    def __init__(self, node: P2PNode, template: Tensors, *, prefix: str, compression: str, aggregation: str,
                 sender_timeout: float, on_refused: Callable[[str, str], None],
                 topk_fraction: float = DEFAULT_TOPK) -> None:
        self.node, self.prefix, self.compression, self.topk_fraction = node, prefix, compression, topk_fraction
        self.reply_codec = CODECS[compression](topk_fraction)[1]
        self.history = History(roundtrip=self._roundtrip) if aggregation == "robust" else None
        self.names = list(template)
        self.shapes = {k: template[k].shape for k in self.names}
        self.sender_timeout = sender_timeout
        self.servicer = RoundServicer(on_refused)
        node.run(self.servicer.add_p2p_handlers(node.p2p, namespace=prefix))

    def _roundtrip(self, part: torch.Tensor) -> torch.Tensor:
        """A part of the average as every member receives it (the reply codec's round trip)."""
        return decode(self.reply_codec.compress(part, CompressionInfo.from_tensor(part)), part.numel())

    def set_weight(self, group: Group, peer_id: str, weight: int) -> None:
        """A member's final weight (before it sends anything); called on a gRPC thread. The running
        all-reduce's copy of the weights is changed on the hivemind loop, which alone reads it."""
        index = group.weigh(peer_id, weight)

        def update() -> None:
            runner = self.servicer.runner
            if runner is not None and runner.group_id == group.group_id:
                runner.sender_weights[1 + index] = float(weight)
        self.node.loop.call_soon_threadsafe(update)

    def reduce(self, group: Group, timeout: float) -> Outcome:
        """Average the group's contributions; never raises for network trouble."""
        try:
            return self.node.run(asyncio.wait_for(self._reduce(group), timeout))
        except asyncio.TimeoutError:
            return Outcome(False, error=f"averaging took longer than {timeout:g} s")
        except Exception as e:
            return Outcome(False, error=f"averaging failed: {type(e).__name__}: {e}"[:300])

    async def _reduce(self, group: Group) -> Outcome:
        members = group.snapshot()  # the weights as they are when the all-reduce starts; set_weight updates the runner's
        peers = list(members)
        tensors = [torch.zeros(self.shapes[k], dtype=torch.float32) for k in self.names]
        scores: dict[str, PartScores] = {}
        robust = stats = None
        if self.history is not None:
            self.history.forget({w for w, _ in members.values()})
            stats = RoundStats()
            robust = dict(keys=[None] + [members[p][0] for p in peers], history=self.history, scores=scores,
                          stats=stats)
        runner = _runner(self.node, tensors, prefix=self.prefix, compression=self.compression,
                         topk_fraction=self.topk_fraction, group_id=group.group_id,
                         peer_ids=[str(self.node.peer_id), *peers], weight=0.0,
                         sender_weights=[0.0] + [float(members[p][1]) for p in peers],
                         sender_timeout=self.sender_timeout, robust=robust)
        self.servicer.runner = runner
        try:
            async for tensor, averaged in azip(as_aiter(*tensors), runner):
                tensor.copy_(averaged)
            await runner.replies_sent(timeout=REPLY_GRACE)  # so that bytes_sent counts the last replies
        finally:
            self.servicer.runner = None
        if self.history is not None:
            self.history.end_round(scores)
        members = group.snapshot()  # with the final weights of those who asked meanwhile
        rejected, lies, flagged = {}, {}, set()
        for peer, reason in runner.rejections:  # not a pseudo-gradient at all: flagged
            rejected[members[peer][0]] = reason
            flagged.add(members[peer][0])
        for peer, claimed in runner.claimed_weights.items():
            worker_id, weight = members[str(peer)]
            if claimed > weight:
                lies[worker_id] = f"claimed weight {claimed:g} in round {group.round}'s averaging; the ledger credits {weight}"
        for p in peers:
            worker_id = members[p][0]
            if worker_id not in rejected and not runner.sent_every_part(PeerID.from_base58(p)):
                rejected[worker_id] = "did not send its whole contribution in time"
        for worker_id, s in scores.items():
            if s.flagged():
                rejected.setdefault(worker_id, f"flagged: {s.summary()}")
                flagged.add(worker_id)
            elif s.mostly_left_out():
                rejected.setdefault(worker_id, f"not in the average: {s.summary()}")
        included = {w: weight for w, weight in members.values() if w not in rejected}
        if not any(included.values()):
            return Outcome(False, included={}, rejected=rejected, lies=lies, scores=scores, flagged=flagged,
                           stats=stats, bytes_sent=runner.bytes_sent,
                           error="no contribution with tokens reached the average")
        return Outcome(True, dict(zip(self.names, tensors)), included, rejected, lies, scores, flagged, stats,
                       runner.bytes_sent)

    def shutdown(self) -> None:
        self.node.run(self.servicer.remove_p2p_handlers(self.node.p2p, namespace=self.prefix))


class RoundContributor:
    """A worker's side. node: its (outgoing-only) P2PNode; template, prefix, compression,
    topk_fraction: as the coordinator's RunConfig says."""

    def __init__(self, node: P2PNode, template: Tensors, *, prefix: str, compression: str,
                 topk_fraction: float = DEFAULT_TOPK) -> None:
        self.node, self.prefix, self.compression, self.topk_fraction = node, prefix, compression, topk_fraction
        self.codecs = CODECS[compression](topk_fraction)  # (what we send in, what the coordinator replies in)
        self.names = list(template)
        self.bytes_sent_total = 0

    def contribute(self, tensors: Tensors, *, group_id: bytes, reducer: str, reducer_maddrs: list[str], weight: float,
                   timeout: float, give_up: Callable[[], bool] | None = None) -> Outcome:
        """Send `tensors` to the round's reducer (the coordinator's peer id, as gRPC said) and
        return the average it sends back. Gives up early once `give_up()` is true; never raises for
        network trouble: the Outcome says what happened."""
        local = [tensors[k].detach().to("cpu", torch.float32).clone() for k in self.names]
        try:
            self.node.connect(reducer, reducer_maddrs)
        except Exception as e:
            return Outcome(False, error=f"cannot reach the coordinator's hivemind peer: {type(e).__name__}: {e}"[:300])
        runners: list[SwarmAllReduceRunner] = []  # the runner is made on the node's event loop, where its asyncio parts live
        future = asyncio.run_coroutine_threadsafe(
            self._contribute(runners, local, prefix=self.prefix, compression=self.compression,
                             topk_fraction=self.topk_fraction, codecs=self.codecs, group_id=group_id,
                             peer_ids=[reducer, str(self.node.peer_id)], weight=float(weight)), self.node.loop)
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

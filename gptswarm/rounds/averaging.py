"""Round averaging through hivemind, shared by the coordinator and the workers: every peer of a
round's group ends with the same bits of the token-weighted average of the group's pseudo-gradients.
Rounds are kept apart by the group key: the round number is the averager's group bits. What this
changes inside hivemind lives in hivemind_ext.py."""

import time
from dataclasses import dataclass, field

import torch

from gptswarm.errors import UserError
from gptswarm.rounds.hivemind_ext import CODECS, SwarmDecentralizedAverager, hivemind, keep_sigint

ROUND_BITS = 24


def round_bits(round_):
    return format(round_ % (1 << ROUND_BITS), f"0{ROUND_BITS}b")


def start_dht(listen="0.0.0.0:0", initial_peers=(), client_mode=False, announce_host=None, identity_path=None):
    """A hivemind DHT peer. listen is HOST:PORT for incoming connections (ignored in client mode);
    identity_path keeps the peer id across restarts (the coordinator's must not change)."""
    host, _, port = listen.rpartition(":")
    kwargs = {"identity_path": str(identity_path)} if identity_path else {}
    if not client_mode:
        kwargs["host_maddrs"] = [f"/ip4/{host or '0.0.0.0'}/tcp/{port or 0}"]
        if announce_host:
            kwargs["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
    try:
        return hivemind.DHT(start=True, initial_peers=list(initial_peers), client_mode=client_mode, **kwargs)
    except Exception as e:
        raise UserError(f"cannot start the hivemind peer on {listen}: {str(e).splitlines()[0][:200]}") from None


@dataclass
class Outcome:
    ok: bool
    averaged: dict = field(default_factory=dict)
    members: list = field(default_factory=list)  # what each groupmate sent with `gather`
    rejected: dict = field(default_factory=dict)  # worker_id -> reason, as seen by this peer's reducer
    bytes_sent: int = 0
    error: str = ""


class SwarmAverager:
    """Averages {name: tensor} dicts of a fixed schema with the other peers of the same round."""

    def __init__(self, dht, template, *, prefix, compression, client_mode, matchmaking_time,
                 target_group_size=256, next_chunk_timeout=10.0):
        """template: {name: tensor} of the averaged schema; prefix: the run's averaging namespace;
        compression: a CODECS name; client_mode: follow only (never lead or reduce);
        matchmaking_time: how long a leader keeps its group open; next_chunk_timeout: a peer that
        stops sending for this long is dropped from the all-reduce instead of failing it."""
        self.names = list(template)
        tensors = [torch.zeros(template[k].shape, dtype=torch.float32) for k in self.names]
        with keep_sigint():
            self.av = SwarmDecentralizedAverager(
                tensors, dht, prefix=prefix, start=True, target_group_size=target_group_size, min_group_size=2,
                min_matchmaking_time=matchmaking_time, request_timeout=max(0.5, matchmaking_time / 2),
                next_chunk_timeout=next_chunk_timeout, compression=CODECS[compression](), client_mode=client_mode,
                initial_group_bits=round_bits(0))
        self.bytes_sent_total = 0
        self.cancel_grace = max(0.5, matchmaking_time / 2) + 0.5  # one matchmaking request_timeout, and some

    def average(self, tensors, *, weight, round_, worker_id, timeout, give_up=None, group_size=None):
        """Average `tensors` (weighted) with the round's group; gives up early once `give_up()` is
        true. A leader given `group_size` closes the group once that many peers are in (else at the
        end of its matchmaking window). Never raises for network trouble: the Outcome says what
        happened."""
        av = self.av
        av.set_group_bits(round_bits(round_))
        if group_size:
            av.set_group_size(group_size)
        with av.get_tensors() as local:
            for t, k in zip(local, self.names):
                t.copy_(tensors[k])
        av.counters.drain_rejections()  # a late report of an earlier round
        before = av.counters.bytes_sent.value
        try:
            control = av.step(weight=float(weight), timeout=timeout, wait=False,
                              gather={"worker_id": worker_id, "round": round_, "tokens": int(weight)})
            while not control.done():
                if give_up is not None and give_up():
                    control.cancel()
                    # the cancel reaches the averager process asynchronously: let it drop the step
                    # before anyone re-keys the averager for the next round
                    time.sleep(self.cancel_grace)
                    return Outcome(False, error="gave up: stopping, or the round is over")
                time.sleep(0.05)
            gathered = control.result()
            error = "" if gathered else "no averaging group formed"
        except Exception as e:  # matchmaking or all-reduce failure: the round goes on without us
            gathered, error = None, f"averaging failed: {type(e).__name__}: {e}"[:300]
        sent = av.counters.bytes_sent.value - before
        self.bytes_sent_total += sent
        if not gathered:
            return Outcome(False, bytes_sent=sent, error=error)
        by_peer = {str(p): g for p, g in gathered.items()}
        members = [g for g in by_peer.values() if isinstance(g, dict)]
        rejected = {by_peer.get(p, {}).get("worker_id", p): reason for p, reason in av.counters.drain_rejections()}
        if any(m.get("round") != round_ for m in members):
            return Outcome(False, members=members, bytes_sent=sent, error="group mixed several rounds")
        with av.get_tensors() as local:
            averaged = {k: t.clone() for k, t in zip(self.names, local)}
        return Outcome(True, averaged, members, rejected, sent)

    def shutdown(self):
        self.av.shutdown()

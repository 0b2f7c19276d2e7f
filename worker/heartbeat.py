"""The worker's heartbeat thread: every heartbeat_interval it tells the coordinator what it is
doing (round, tokens, state and reason, leases to extend) and keeps the coordinator's answer in
the shared state; every 10 s it logs the progress line. An unreachable coordinator is logged once
per outage, and training goes on.

When the swarm's pace says the round is about to reach its tokens, it beats every FAST_BEAT
seconds instead (or as often as the coordinator allows for the swarm's size): its tokens reach
the coordinator's count when they end the round, and it learns that the round is averaging within
FAST_BEAT of it, not a heartbeat interval later."""

import logging
import threading
import time
from collections.abc import Callable

from gptswarm.states import Phase, WorkerState
from gptswarm.worker.client import CoordinatorClient
from gptswarm.worker.state import SharedState

log = logging.getLogger("gptswarm.worker")
PROGRESS_SECONDS = 10.0
FAST_BEAT = 0.1  # seconds between heartbeats while the round is about to end
UNREACHABLE = "coordinator unreachable"


class Heartbeats:
    """shared: SharedState; client: CoordinatorClient; interval: seconds; bytes_sent: fn() -> bytes
    this worker sent for averaging so far.

    Its thread reads the shared state and writes the coordinator's answer into it, both under the
    shared state's lock, and talks to the coordinator through the client (made for every thread);
    beat() may also run on the round loop, which touches nothing more. `stop` is its only field
    another thread writes (an Event)."""

    def __init__(self, shared: SharedState, client: CoordinatorClient, *, interval: float,
                 bytes_sent: Callable[[], int]) -> None:
        self.shared, self.client, self.interval, self.bytes_sent = shared, client, interval, bytes_sent
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> "Heartbeats":
        self.thread.start()
        return self

    def shutdown(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=3)

    def _run(self) -> None:
        last_progress = time.monotonic()
        while not self.stop.wait(self.next_wait()):
            if time.monotonic() - last_progress >= PROGRESS_SECONDS:
                last_progress = time.monotonic()
                log_progress(self.shared)
            self.beat()

    def next_wait(self) -> float:
        """Seconds to the next heartbeat: the interval, or less when the swarm's tokens per second
        say the round ends sooner (at least FAST_BEAT)."""
        s = self.shared
        with s.lock:
            v, at, state = s.view, s.heard_at, s.state
        if (v is None or state != WorkerState.TRAINING or v.phase != Phase.TRAINING
                or v.swarm_tokens_per_second <= 0):
            return self.interval
        fast = max(FAST_BEAT, v.fast_beat_seconds)  # the coordinator paces them by the swarm's size
        left = (v.tokens_per_round - v.swarm_round_tokens) / v.swarm_tokens_per_second - (time.monotonic() - at)
        return min(self.interval, max(fast, left + fast))

    def beat(self) -> None:
        """One heartbeat now (also called by the round loop to learn of a new round at once)."""
        s = self.shared
        bytes_sent = self.bytes_sent()
        with s.lock:  # the round and its claims in one critical section (the round loop may move it on)
            round_, state, reason, tps = s.round, s.state, s.reason, s.tokens_per_second
            lease_ids, claims = s.lease_ids_locked(), dict(s.round_leases)
            loss = sum(s.losses) / len(s.losses) if s.losses else 0.0
        try:
            resp = self.client.heartbeat(round_=round_, state=state, reason=reason, tokens_per_second=tps,
                                         lease_ids=lease_ids, claims=claims, loss=loss, bytes_sent=bytes_sent)
        except Exception as e:  # noqa: BLE001 (whatever it is, training goes on and the next beat tries again)
            code = getattr(e, "code", lambda: None)()
            unreachable(s, None, f"{UNREACHABLE} ({code.name if code else type(e).__name__}); training on, retrying")
            return
        s.heard(resp)


def unreachable(shared: SharedState, state: WorkerState | None, reason: str) -> None:
    """Record that the coordinator is unreachable (in `state`; None: the state stays); log it once
    per outage, not at every retry."""
    with shared.lock:
        first = not shared.reason.startswith(UNREACHABLE)
        shared.state, shared.reason = shared.state if state is None else state, reason
    if first:
        log.warning("%s", reason)


def log_progress(shared: SharedState) -> None:
    """The terminal's status line (a JSON record with --json-logs)."""
    s = shared
    with s.lock:
        v, state, reason = s.view, s.state, s.reason
        fields = {"round": s.round, "state": state, "reason": reason, "tokens_per_second": round(s.tokens_per_second),
                  "round_tokens": s.round_tokens, "tokens_contributed": s.tokens_contributed}
    eta = ""
    if v is not None and v.swarm_tokens_per_second > 0 and state == WorkerState.TRAINING:
        left = max(0, v.tokens_per_round - v.swarm_round_tokens)
        eta = f" · sync in ~{left / v.swarm_tokens_per_second:.0f} s"
    what = state + (f" ({reason})" if reason else "")
    log.info("round %d · %s · %s tok/s · %s tokens this round · %s contributed%s", fields["round"], what,
             f"{fields['tokens_per_second']:,}", f"{fields['round_tokens']:,}", f"{fields['tokens_contributed']:,}",
             eta, extra={"fields": fields})

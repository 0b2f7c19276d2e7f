"""How much of its time the worker spends in training steps: seconds inside the steps it took
between its first step and the last round it finished, over that wall time (waiting, averaging,
leasing and loading count against it; steps after the last round, whose work no round used, count
for nothing); logged when it leaves. Also the join latency: seconds from process start to the
first step."""

import logging
import time
from collections.abc import Callable

import psutil

log = logging.getLogger("gptswarm.worker")


class Utilization:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.compute_seconds = 0.0  # in all steps so far
        self.compute_at_sync = 0.0  # ... in the steps before the last round it finished
        self.first_step_at: float | None = None
        self.last_sync_at: float | None = None

    def step(self, seconds: float) -> None:
        """A training step that took `seconds` just ended."""
        if self.first_step_at is None:
            self.first_step_at = self.clock() - seconds
            since = self.first_step_at - psutil.Process().create_time()
            log.info("training: first batch %.1f s after the worker started", since,
                     extra={"fields": {"event": "first_step", "seconds_since_start": round(since, 2)}})
        self.compute_seconds += seconds

    def synced(self, ahead_seconds: float = 0.0) -> None:
        """A round just ended for this worker; ahead_seconds of its steps were trained for the next
        round while this one averaged (they count when the next round ends)."""
        self.last_sync_at = self.clock()
        self.compute_at_sync = self.compute_seconds - ahead_seconds

    def share(self) -> tuple[float, float, float] | None:
        """(compute seconds, wall seconds, their ratio) from the first step to the last round, or None."""
        if self.first_step_at is None or self.last_sync_at is None or self.last_sync_at <= self.first_step_at:
            return None
        wall = self.last_sync_at - self.first_step_at
        return self.compute_at_sync, wall, self.compute_at_sync / wall

    def log(self) -> None:
        measured = self.share()
        if measured is None:
            return
        compute, wall, share = measured
        log.info("computed %.0f%% of the time (%.1f s in training steps of %.1f s from the first step to the last "
                 "round)", 100 * share, compute, wall,
                 extra={"fields": {"event": "utilization", "compute_seconds": round(compute, 2),
                                   "wall_seconds": round(wall, 2), "compute_utilization": round(share, 4)}})

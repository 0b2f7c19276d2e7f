"""How much of its time the worker spends in training steps: seconds inside steps, from the first
step to the last round it finished (waiting, averaging, leasing and loading count against it);
logged when it leaves. Also the join latency: seconds from process start to the first step."""

import logging
import time

import psutil

log = logging.getLogger("gptswarm.worker")


class Utilization:
    def __init__(self):
        self.compute_seconds = 0.0
        self.first_step_at = self.last_sync_at = None

    def step(self, seconds):
        """A training step that took `seconds` just ended."""
        if self.first_step_at is None:
            self.first_step_at = time.time() - seconds
            since = self.first_step_at - psutil.Process().create_time()
            log.info("training: first batch %.1f s after the worker started", since,
                     extra={"fields": {"event": "first_step", "seconds_since_start": round(since, 2)}})
        self.compute_seconds += seconds

    def synced(self):
        """A round just ended for this worker."""
        self.last_sync_at = time.time()

    def log(self):
        if self.first_step_at is None or self.last_sync_at is None:
            return
        wall = self.last_sync_at - self.first_step_at
        share = min(self.compute_seconds, wall) / wall if wall > 0 else 0.0
        log.info("computed %.0f%% of the time (%.1f s in training steps of %.1f s from the first step to the last "
                 "round)", 100 * share, self.compute_seconds, wall,
                 extra={"fields": {"event": "utilization", "compute_seconds": round(self.compute_seconds, 2),
                                   "wall_seconds": round(wall, 2), "compute_utilization": round(share, 4)}})

"""When the worker should not train, and why: the volunteer's pause (kept across restarts),
`finish`, --max-hours, --schedule and --idle-only. The round loop asks before every step; the
control socket changes it from another thread."""

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gptswarm.states import WorkerState
from gptswarm.worker.idle import IdleDetector
from gptswarm.worker.schedule import Schedule


class PausePolicy:
    """state_dir: where the volunteer's pause is kept; schedule: a worker.schedule.Schedule or None;
    idle: a worker.idle.IdleDetector or None; max_hours: finish after this many hours (0: never).

    The control thread calls pause() and finish(), the round loop reason(): the volunteer's pause
    (and its file) changes under `_lock`, `finishing` is an Event, and the probes' last answer
    (_polled, _polled_at) is the round loop's alone."""

    poll_seconds = 2.0  # the schedule and the idle probes are asked this often, not every step

    def __init__(self, state_dir: Path, *, schedule: Schedule | None = None, idle: IdleDetector | None = None,
                 max_hours: float = 0.0, clock: Callable[[], float] = time.time) -> None:
        self.flag = state_dir / WorkerState.PAUSED  # its file is named for the state it keeps
        self.schedule, self.idle, self.max_hours, self.clock = schedule, idle, max_hours, clock
        self.started_at = clock()
        self.finishing = threading.Event()
        self._lock = threading.Lock()
        self._paused = self.flag.exists()
        self._polled_at, self._polled = float("-inf"), ""

    @property
    def paused(self) -> bool:
        with self._lock:
            return self._paused

    def pause(self, paused: bool) -> None:
        """The volunteer's pause (True) or resume (False); it survives a restart."""
        with self._lock:
            self._paused = paused
            if paused:
                self.flag.write_text(json.dumps({"paused_at": self.clock()}))
            elif self.flag.exists():
                self.flag.unlink()

    def finish(self) -> None:
        self.finishing.set()

    def reason(self) -> str:
        """Why not to train now, or "" to train."""
        if self.finishing.is_set():
            return "finishing: waiting for the round to end, then leaving"
        if self.paused:
            return "paused by you (`gptswarm worker resume` continues)"
        if self.max_hours and self.clock() - self.started_at > self.max_hours * 3600:
            self.finishing.set()
            return f"--max-hours {self.max_hours:g} reached: finishing the round"
        now = time.monotonic()
        if now - self._polled_at > self.poll_seconds:
            self._polled_at = now
            self._polled = self.schedule.reason() if self.schedule else ""
            if not self._polled and self.idle is not None:
                self._polled = self.idle.check()[1]
        return self._polled

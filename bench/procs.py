"""The processes a benchmark starts, each in a process group of its own, so that every one of them
(and what it started: a worker's hivemind daemon, the command `ip netns exec` runs) is gone when the
benchmark leaves the block, whether it ends well or not."""

import os
import signal
import subprocess
import time

GRACE = 15.0  # seconds between SIGTERM (a worker leaves cleanly) and SIGKILL


class Children:
    def __init__(self):
        self.procs = []

    def start(self, argv, **kw):
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    @staticmethod
    def signal(p, sig):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def alive(p):
        try:
            os.killpg(p.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def stop(self, p, grace=GRACE):
        """SIGTERM to p's whole group, then SIGKILL to whatever of it is left after grace seconds."""
        self.signal(p, signal.SIGTERM)
        deadline = time.time() + grace
        while self.alive(p) and time.time() < deadline:
            p.poll()  # reap the leader, or its group stays "alive" as a zombie
            time.sleep(0.1)
        self.signal(p, signal.SIGKILL)
        p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            self.signal(p, signal.SIGTERM)
        deadline = time.time() + GRACE
        while any(self.alive(p) for p in self.procs) and time.time() < deadline:
            for p in self.procs:
                p.poll()
            time.sleep(0.1)
        for p in self.procs:
            self.signal(p, signal.SIGKILL)
            p.wait()

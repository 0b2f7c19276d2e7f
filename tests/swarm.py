"""Real swarm processes for the end-to-end tests: `gptswarm coordinator` and `gptswarm worker`
started through the installed console script, on loopback."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

EXE = str(Path(sys.executable).with_name("gptswarm"))
JOIN = re.compile(r"gptswarm worker --join (\S+) --token (\S+)")
FAST = ["--http", "127.0.0.1:0", "--tokens-per-round", "6000", "--sender-timeout", "4", "--heartbeat-interval", "0.5",
        "--lease-seconds", "4", "--shard-tokens", "2048", "--lr", "2e-3"]


class Process:
    """args: the `gptswarm` command's arguments, or (exe=None) a whole command line."""

    def __init__(self, args, env=None, exe=EXE, cwd=None):
        self.args = args
        self.lines = []
        self.p = subprocess.Popen([*([exe] if exe else []), *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True, cwd=cwd,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self):
        return "\n".join(self.lines)

    def wait_for(self, pattern, timeout=90):
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{self.output()[-3000:]}")

    def count(self, pattern):
        rx = re.compile(pattern)
        return sum(1 for line in list(self.lines) if rx.search(line))

    def signal(self, sig):
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def kill(self):
        """SIGKILL the whole process group (hivemind's helper processes included)."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()

    def stop(self, timeout=20):
        self.signal(signal.SIGINT)
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def coordinator(state_dir, *extra, listen="127.0.0.1:0", p2p="127.0.0.1:0", token="sekrit"):
    return Process(["coordinator", "--task", "addition", "--model", "gpt-nano", "--state-dir", state_dir,
                    "--listen", listen, "--p2p-listen", p2p, "--token", token, *FAST, *extra])


def join_address(coord):
    return coord.wait_for(JOIN.pattern).group(1)


def worker(join, name, *extra, token="sekrit", env=None):
    """A worker process; each gets its own --state-dir (control socket) unless one is given."""
    if "--state-dir" not in extra:
        extra = (*extra, "--state-dir", tempfile.mkdtemp(prefix="gptswarm-worker-"))
    return Process(["worker", "--join", join, "--token", token, "--name", name, "--device", "cpu", "--threads", "1",
                    *extra], env=env)


def hostile_worker(join, name, attack, token="sekrit"):
    """A worker process whose contribution is tampered with (bench/hostile_worker.py)."""
    args = [sys.executable, "-m", "bench.hostile_worker", "--attack", attack, "--join", join, "--token", token,
            "--name", name, "--state-dir", tempfile.mkdtemp(prefix="gptswarm-hostile-")]
    return Process(args, exe=None, cwd=Path(__file__).resolve().parents[1])


def ledger(state_dir, sql, args=()):
    db = sqlite3.connect(Path(state_dir) / "ledger.sqlite", timeout=30)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def wait_until(fn, timeout=60, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")

"""Real swarm processes for the end-to-end tests: `gptswarm coordinator` and `gptswarm worker`
started through the installed console script, on loopback."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from gptswarm import transport

EXE = str(Path(sys.executable).with_name("gptswarm"))
JOIN = re.compile(r"GPTSWARM_TOKEN=(\S+) gptswarm worker --join (\S+) (?:--tls-fingerprint (\S+)|--plaintext)")
FAST = ["--http", "127.0.0.1:0", "--tokens-per-round", "6000", "--inner-steps", "4", "--sender-timeout", "4", "--heartbeat-interval", "0.5",
        "--lease-seconds", "4", "--shard-tokens", "2048", "--lr", "2e-3"]


class Process:
    """args: the `gptswarm` command's arguments, or (exe=None) a whole command line."""

    def __init__(self, args, env=None, exe=EXE, cwd=None):
        self.args = args
        self.lines = []
        logs = os.environ.get("GPTSWARM_TEST_LOGS")  # a folder: each process's output is kept there too
        self.log = open(Path(logs) / f"{time.time():.3f}-{Path(str(args[0])).name}.log", "w") if logs else None
        self.p = subprocess.Popen([*([exe] if exe else []), *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True, cwd=cwd,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.log is not None:
                self.log.write(line)
                self.log.flush()

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
    """A coordinator process, over TLS (its own certificate) unless extra has --plaintext; token
    None: the saved one (or, with --rotate-token, a new one)."""
    return Process(["coordinator", "--task", "addition", "--model", "gpt-nano", "--state-dir", state_dir,
                    "--listen", listen, "--p2p-listen", p2p, *FAST, *extra], env={"GPTSWARM_TOKEN": token} if token else None)


class Join(str):
    """The coordinator's HOST:PORT, with the certificate fingerprint to pin ("" in plaintext)."""

    pin = ""

    def worker_args(self):
        return ["--tls-fingerprint", self.pin] if self.pin else ["--plaintext"]


def join_address(coord):
    m = coord.wait_for(JOIN.pattern)
    join = Join(m.group(2))
    join.pin = m.group(3) or ""
    return join


def channel(join):
    """A gRPC channel to the coordinator, as a worker opens it."""
    return transport.channel(join, pin=join.pin, plaintext=not join.pin)


def worker(join, name, *extra, token="sekrit", env=None):
    """A worker process; each gets its own --state-dir (control socket) unless one is given."""
    if "--state-dir" not in extra:
        extra = (*extra, "--state-dir", tempfile.mkdtemp(prefix="gptswarm-worker-"))
    return Process(["worker", "--join", join, *join.worker_args(), "--name", name, "--device", "cpu",
                    "--threads", "1", *extra], env={"GPTSWARM_TOKEN": token, **(env or {})})


def hostile_worker(join, name, attack, token="sekrit"):
    """A worker process whose contribution is tampered with (bench/hostile_worker.py)."""
    args = [sys.executable, "-m", "bench.hostile_worker", "--attack", attack, "--join", join, *join.worker_args(),
            "--name", name, "--state-dir", tempfile.mkdtemp(prefix="gptswarm-hostile-")]
    return Process(args, exe=None, cwd=Path(__file__).resolve().parents[1], env={"GPTSWARM_TOKEN": token})


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


def status_and_metrics(coord):
    """What a coordinator process's status page says of its workers ({name: row}), and its /metrics text."""
    page = coord.wait_for(r"status page: (http://\S+)").group(1)
    with urllib.request.urlopen(page + "api/v1/status", timeout=10) as r:
        shown = {w["name"]: w for w in json.loads(r.read())["workers"]}
    with urllib.request.urlopen(page + "metrics", timeout=10) as r:
        return shown, r.read().decode()

"""`gptswarm demo`: a whole swarm on this machine (a coordinator and N workers, as separate
processes) training on the built-in addition task."""

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

from gptswarm.errors import UserError

JOIN_LINE = re.compile(r"gptswarm worker --join (\S+) --tls-fingerprint (\S+)")
PAGE_LINE = re.compile(r"status page: (http://\S+)")


class Proc:
    """A child process whose output lines are echoed with a prefix (and watched for a pattern)."""

    def __init__(self, name, args, env=None):
        self.name = name
        self.lines = []
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                  env={**os.environ, **(env or {})}, start_new_session=True)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        for line in self.p.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.strip():
                click.echo(f"[{self.name:>12}] {line}")

    def signal(self, sig):
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self, timeout):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            return self.p.wait()


def gptswarm(*args):
    return [sys.executable, "-m", "gptswarm", *map(str, args)]


@click.command()
@click.option("--workers", default=2, show_default=True, help="Number of worker processes.")
@click.option("--state-dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="The coordinator's state directory (kept afterwards; reused to resume).")
@click.option("--port", default=0, help="gRPC port of the coordinator (default: any free port).")
@click.option("--http-port", default=7780, show_default=True, help="Port of the status page (0: any free port).")
@click.option("--max-tokens", default=1_500_000, show_default=True, help="Token budget of the demo run.")
@click.option("--tokens-per-round", default=40_000, show_default=True, help="Tokens the swarm trains per round.")
def demo(workers, state_dir, port, http_port, max_tokens, tokens_per_round):
    """Run a local swarm: a coordinator and --workers workers on this machine train a small GPT
    to add two-digit numbers. Watch the rounds go by; Ctrl+C stops all of it cleanly."""
    if workers < 1:
        raise UserError("--workers must be at least 1")
    token = secrets.token_urlsafe(12)
    threads = max(1, (os.cpu_count() or 2) // workers)
    coord = Proc("coordinator", gptswarm(
        "coordinator", "--task", "addition", "--model", "gpt-nano", "--state-dir", state_dir,
        "--listen", f"127.0.0.1:{port}", "--p2p-listen", "127.0.0.1:0", "--http", f"127.0.0.1:{http_port}",
        "--tokens-per-round", tokens_per_round, "--max-tokens", max_tokens, "--lr", "2e-3", "--sender-timeout", "3",
        "--shard-tokens", "8192"), env={"OMP_NUM_THREADS": "1", "GPTSWARM_TOKEN": token})
    procs = [coord]
    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        join, pin = wait_for_line(coord, JOIN_LINE, stopping, groups=2)
        page = wait_for_line(coord, PAGE_LINE, stopping)
        for i in range(workers):
            procs.append(Proc(f"volunteer-{i + 1}", gptswarm(
                "worker", "--join", join, "--tls-fingerprint", pin, "--name", f"volunteer-{i + 1}", "--device", "cpu",
                "--threads", threads, "--state-dir", Path(state_dir) / "workers" / f"volunteer-{i + 1}"),
                env={"OMP_NUM_THREADS": str(threads), "GPTSWARM_TOKEN": token}))
        click.echo(f"\n  swarm is up: coordinator at {join}, {workers} workers, state in {state_dir}\n"
                   f"  watch it at {page} (status page: workers, loss curves, shards, events)\n"
                   f"  each round the coordinator logs its validation loss; workers log the theta hash check\n"
                   f"  a worker in another terminal could join with:\n"
                   f"    GPTSWARM_TOKEN={token} gptswarm worker --join {join} --tls-fingerprint {pin}\n"
                   f"  Ctrl+C stops everything; afterwards: gptswarm eval {state_dir}/checkpoints/latest "
                   f"--task addition\n")
        while not stopping.wait(0.5):
            if all(p.p.poll() is not None for p in procs[1:]):  # the workers left: the run is finished
                break
            if coord.p.poll() is not None:
                raise UserError("the coordinator stopped unexpectedly")
    finally:
        click.echo("\n  stopping the swarm ...")
        for p in procs[1:]:
            p.signal(signal.SIGINT)
        for p in procs[1:]:
            p.wait(15)
        coord.signal(signal.SIGINT)
        coord.wait(15)
        for p in procs:
            p.thread.join(timeout=2)
    latest = Path(state_dir) / "checkpoints" / "latest"
    click.echo(f"  stopped. The model is in {latest}: gptswarm eval {latest} --task addition")


def wait_for_line(coord, pattern, stopping, timeout=120, groups=1):
    """The first `groups` groups of the first line of coord's output that matches pattern (one
    group: as a string)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not stopping.is_set():
        for line in list(coord.lines):
            m = pattern.search(line)
            if m:
                return m.group(1) if groups == 1 else m.groups()[:groups]
        if coord.p.poll() is not None:
            raise UserError("the coordinator failed to start (see its output above)")
        time.sleep(0.2)
    raise UserError("the coordinator did not come up in time")

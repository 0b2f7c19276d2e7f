"""Pause, resume and finish a real worker in a real local swarm through its control socket, with
the reason shown on the coordinator's status page."""

import json
import signal
import urllib.request

from conftest import run_cli
from swarm import coordinator, join_address, ledger, wait_until, worker


def state_of(sd, name):
    rows = ledger(sd, "SELECT state, reason FROM workers WHERE name = ? ORDER BY joined_at DESC LIMIT 1", (name,))
    return rows[0] if rows else (None, None)


def page_row(page, name):
    with urllib.request.urlopen(page + "api/v1/status", timeout=10) as r:
        return next(w for w in json.loads(r.read())["workers"] if w["name"] == name and w["online"])


def control(ws, cmd):
    r = run_cli("worker", cmd, "--state-dir", ws, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_pause_resume_finish(tmp_path):
    sd, ws = tmp_path / "state", tmp_path / "vol"
    coord = coordinator(sd)
    procs = [coord]
    try:
        join = join_address(coord)
        page = coord.wait_for(r"status page: (http://\S+)").group(1)
        procs.append(worker(join, "other"))
        vol = worker(join, "vol", "--state-dir", ws)
        procs.append(vol)
        wait_until(lambda: ledger(sd, "SELECT 1 FROM contributions c JOIN workers w ON w.id = c.worker_id "
                                      "WHERE w.name = 'vol' AND c.included = 1"), 120, "vol to contribute")

        assert control(ws, "pause")["paused"] is True
        wait_until(lambda: state_of(sd, "vol")[0] == "paused", 30, "the pause to reach the coordinator")
        assert "paused by you" in state_of(sd, "vol")[1]
        row = page_row(page, "vol")
        assert row["state"] == "paused" and "paused by you" in row["reason"]  # the reason on the status page
        # (a worker paused mid-round first averages what it trained in it, then shows as paused)
        wait_until(lambda: "state:   paused (paused by you" in run_cli("worker", "status", "--state-dir", ws).stdout,
                   30, "`worker status` to say paused")
        # while paused it trains nothing: no shard stays leased to it, rounds go on without it
        wait_until(lambda: not ledger(sd, "SELECT 1 FROM leases l JOIN workers w ON w.id = l.worker_id "
                                          "WHERE w.name = 'vol' AND l.state = 'active'"), 30, "vol to hold no lease")
        n = len(ledger(sd, "SELECT 1 FROM rounds WHERE state = 'done'"))
        wait_until(lambda: len(ledger(sd, "SELECT 1 FROM rounds WHERE state = 'done'")) >= n + 2, 90, "rounds")
        assert not ledger(sd, "SELECT 1 FROM leases l JOIN workers w ON w.id = l.worker_id "
                              "WHERE w.name = 'vol' AND l.state = 'active'")

        # the pause survives a restart
        vol.signal(signal.SIGINT)
        assert vol.p.wait(15) == 0
        vol = worker(join, "vol", "--state-dir", ws, "--json-logs")
        procs.append(vol)
        wait_until(lambda: state_of(sd, "vol")[0] == "paused", 60, "the restarted worker to stay paused")
        vol.wait_for("resuming as w-")  # the same worker: one identity, one contribution total
        assert ledger(sd, "SELECT COUNT(*) FROM workers WHERE name = 'vol'")[0][0] == 1
        assert "rejoin" in [k for (k,) in ledger(sd, "SELECT kind FROM events")]

        assert control(ws, "resume")["paused"] is False
        wait_until(lambda: state_of(sd, "vol")[0] in ("training", "averaging"), 60, "vol to train again")

        progress = vol.wait_for(r'^\{.*"tokens_contributed"', 30)  # --json-logs: the progress line as JSON
        record = json.loads(progress.string)
        assert record["level"] == "info" and {"round", "state", "tokens_per_second"} <= set(record)
        reply = control(ws, "finish")
        assert reply["finishing"] is True
        assert vol.p.wait(120) == 0
        vol.wait_for("finished: the last round's contribution is reported; leaving")
        assert not ledger(sd, "SELECT 1 FROM leases l JOIN workers w ON w.id = l.worker_id "
                              "WHERE w.name = 'vol' AND l.state = 'active'")
        r = run_cli("worker", "status", "--state-dir", ws)
        assert r.returncode == 1 and "no worker is running" in r.stderr
    finally:
        for p in procs:
            p.kill()


def test_control_socket_is_one_worker_per_state_dir(tmp_path):
    import pytest

    from gptswarm.errors import UserError
    from gptswarm.worker.control import ControlServer, ping, send

    seen = []
    server = ControlServer(tmp_path, lambda cmd: seen.append(cmd) or {"state": "training", "cmd": cmd})
    try:
        assert ping(tmp_path / "control.sock")  # a bare ping leaves the server serving
        assert send(tmp_path, "status") == {"state": "training", "cmd": "status"}
        with pytest.raises(UserError, match="another worker is already running"):
            ControlServer(tmp_path, lambda cmd: {})
        assert send(tmp_path, "pause")["cmd"] == "pause" and seen == ["status", "pause"]
    finally:
        server.close()
    with pytest.raises(UserError, match="no worker is running"):
        send(tmp_path, "status")
    import socket

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # what a SIGKILLed worker leaves behind
    stale.bind(str(tmp_path / "control.sock"))
    stale.close()
    assert (tmp_path / "control.sock").exists()
    ControlServer(tmp_path, lambda cmd: {}).close()  # is taken over, not mistaken for a running worker


def test_control_socket_of_a_deep_state_dir(tmp_path):
    """A state dir too deep for a Unix socket's path (108 bytes) still gets a control socket."""
    from gptswarm.worker.control import ControlServer, send, socket_path

    deep = tmp_path / ("x" * 60) / ("y" * 60)
    server = ControlServer(deep, lambda cmd: {"cmd": cmd})
    try:
        assert len(str(socket_path(deep))) <= 100 and send(deep, "status") == {"cmd": "status"}
    finally:
        server.close()

"""`gptswarm demo`: a coordinator and two workers come up, finish a round, and Ctrl+C stops all
of them cleanly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

EXE = str(Path(sys.executable).with_name("gptswarm"))


def test_demo_trains_and_stops_cleanly(tmp_path):
    p = subprocess.Popen([EXE, "demo", "--state-dir", tmp_path / "demo", "--max-tokens", "400000", "--http-port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, t0 = [], time.time()
    try:
        for line in p.stdout:
            lines.append(line)
            if "round 0 done" in line and "coordinator" in line:
                break
            assert time.time() - t0 < 240, "".join(lines[-40:])
        assert "round 0 done" in lines[-1], "".join(lines[-40:])
        children = psutil.Process(p.pid).children(recursive=True)
        assert len(children) >= 3  # coordinator, two workers (and their hivemind helpers)
        p.send_signal(signal.SIGINT)  # what Ctrl+C in its terminal does
        rest, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = "".join(lines) + rest
    assert p.returncode == 0, out[-3000:]
    assert "swarm is up" in out and "gptswarm worker --join" in out and "watch it at http://127.0.0.1:" in out
    assert out.count("left the swarm") == 2 and "stopped." in out
    assert "Traceback" not in out
    time.sleep(1)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert (tmp_path / "demo" / "checkpoints" / "latest" / "model.safetensors").exists()

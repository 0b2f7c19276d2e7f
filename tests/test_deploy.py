"""deploy/: the systemd units pass `systemd-analyze verify`, the Prometheus config passes
`promtool check config`, the compose file describes the demo swarm."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_status_page import need

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_systemd_units_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd is not available on this machine")
    venv = Path(sys.executable).parent.parent  # the units name /opt/gptswarm/venv; point them at this install
    units = []
    for unit in sorted((DEPLOY / "systemd").iterdir()):
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/gptswarm/venv", str(venv)))
        units.append(str(tmp_path / unit.name))
    assert {Path(u).name for u in units} == {"gptswarm-coordinator.service", "gptswarm-reducer.service",
                                              "gptswarm-worker.service", "gptswarm-worker.timer"}
    r = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_prometheus_scrape_config():
    promtool = need("promtool")
    r = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_demo_swarm():
    c = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    assert set(c["services"]) == {"coordinator", "worker"}
    assert c["services"]["worker"]["deploy"]["replicas"] == 2
    assert c["services"]["worker"]["environment"]["GPTSWARM_JOIN"] == "coordinator:7733"
    for name in ("Dockerfile.coordinator", "Dockerfile.worker"):
        text = (DEPLOY / "docker" / name).read_text()
        assert "pip install --no-cache-dir ." in text and "STOPSIGNAL SIGINT" in text

"""The coordinator's status page, JSON API and Prometheus metrics, against a running swarm, in a
real headless Chromium."""

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from gptswarm.proto import PROTOCOL_VERSION
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.proto import gptswarm_pb2_grpc as pb_grpc
from swarm import channel, coordinator, join_address, ledger, wait_until, worker

SCRIPT_NAME = "<script>alert(1)</script>"
IMG_NAME = '<img src=x onerror="window.__pwned=1">'
LIAR = "liar"
NEED_TOOLS = os.environ.get("GPTSWARM_REQUIRE_BROWSER") == "1"  # CI installs them; a laptop may not have them


def need(tool):
    path = shutil.which(tool)
    if path is None:
        (pytest.fail if NEED_TOOLS else pytest.skip)(f"{tool} is not installed (apt-get install chromium "
                                                     "chromium-driver prometheus)")
    return path


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers, r.read()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    sd = tmp_path_factory.mktemp("status") / "state"
    coord = coordinator(sd)
    procs = [coord]
    try:
        join = join_address(coord)
        page = coord.wait_for(r"status page: (http://\S+)").group(1)
        procs += [worker(join, SCRIPT_NAME), worker(join, IMG_NAME)]
        wait_until(lambda: len(ledger(sd, "SELECT 1 FROM rounds WHERE state = 'done'")) >= 2, 150, "two rounds")
        # at join, each worker measured its throughput and learned it has nothing to open
        assert all(p.count(r"throughput [\d,]+ tokens/s on cpu") == 1 for p in procs[1:])
        assert all(p.count("only dials out") == 1 for p in procs[1:])
        lie(join)
        yield page.rstrip("/"), sd
    finally:
        for p in procs:
            p.kill()


def lie(join):
    """A client with a valid token that claims tokens on a lease it never held: refused, and shown."""
    with channel(join) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        joined = stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, token="sekrit", name=LIAR,
                                          peer_id="QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"))
        auth = [("authorization", f"Bearer {joined.session}")]
        view = stub.Heartbeat(pb.HeartbeatRequest(round=0, state="joining"), metadata=auth)
        stub.Heartbeat(pb.HeartbeatRequest(round=view.round, state="training", lease_tokens=[
            pb.LeaseTokens(lease_id="l-not-mine", tokens=10**9)]), metadata=auth)


def test_status_json(swarm):
    url, _ = swarm
    status, headers, body = get(url + "/api/v1/status")
    assert status == 200 and headers["Content-Type"] == "application/json"
    s = json.loads(body)
    assert set(s) >= {"run", "health", "workers", "shards", "rounds", "top_contributors", "events", "generated_at"}
    assert s["health"]["state"] in ("healthy", "degraded") and s["health"]["reason"]
    assert s["run"]["round"] >= 2 and s["run"]["tokens_trained"] > 0 and s["run"]["max_tokens"] > 0
    assert {w["name"] for w in s["workers"]} == {SCRIPT_NAME, IMG_NAME, LIAR}  # stored and served verbatim, as data
    refused = {w["name"]: (w["refused"], w["last_refusal"]) for w in s["workers"]}
    assert refused[SCRIPT_NAME] == refused[IMG_NAME] == (0, "")  # honest workers: nothing refused
    assert refused[LIAR][0] == 1 and "tokens_clamped" in refused[LIAR][1] and "l-not-mine" in refused[LIAR][1]
    assert any(e["kind"] == "refused" and e["worker"] == LIAR for e in s["events"])
    assert s["run"]["tokens_trained"] < 10**9  # the lie moved nothing
    for w in s["workers"]:
        assert set(w) >= {"state", "reason", "device", "tokens_per_second", "tokens_contributed", "last_seen"}
    assert len([r for r in s["rounds"] if r["state"] == "done"]) >= 2
    assert s["shards"]["total"] == s["shards"]["pending"] + s["shards"]["leased"] + s["shards"]["done"]
    assert b"sekrit" not in body and b"session" not in body  # no token or credential, ever
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")


def test_metrics_are_valid_prometheus(swarm):
    url, _ = swarm
    promtool = need("promtool")
    status, headers, body = get(url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in ("gptswarm_tokens_trained_total", "gptswarm_round", 'gptswarm_workers{state="training"}',
                 "gptswarm_val_loss", "gptswarm_averaging_bytes_sent_total", "gptswarm_averaging_seconds_total",
                 "gptswarm_leases_expired_total", "gptswarm_contributions_rejected_total", 'gptswarm_health{state=',
                 'gptswarm_refused_claims_total{kind="tokens_clamped"} 1.0'):
        assert name in text, name
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert b"sekrit" not in body


def test_page_in_a_real_browser(swarm, tmp_path):
    url, _ = swarm
    chromium, driver_path = need("chromium"), need("chromedriver")
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--disable-component-update", "--no-first-run", "--window-size=1200,1500",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.body.dataset.loaded") == "1")
        WebDriverWait(browser, 30).until(
            lambda b: int(b.find_element(By.ID, "loss-chart").get_attribute("data-points") or 0) >= 2)
        rows = browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
        assert len(rows) == 3
        names = {r.find_element(By.CSS_SELECTOR, "td.name").text for r in rows}
        assert names == {SCRIPT_NAME, IMG_NAME, LIAR}  # shown as text
        liar = next(r for r in rows if r.find_element(By.CSS_SELECTOR, "td.name").text == LIAR)
        assert "tokens_clamped" in liar.find_element(By.CSS_SELECTOR, "td.refused").text  # the lie, on the page
        assert not browser.find_elements(By.CSS_SELECTOR, "#workers script, #workers img")  # not parsed as HTML
        assert browser.execute_script("return window.__pwned") is None
        try:
            browser.switch_to.alert
            pytest.fail("a worker's name executed as script")
        except NoAlertPresentException:
            pass
        health = browser.find_element(By.ID, "health")
        assert health.get_attribute("data-state") in ("healthy", "degraded") and ":" in health.text
        assert browser.find_element(By.ID, "round").text not in ("", "–")
        # the chart is really drawn: the canvas has coloured pixels, not just the background
        coloured = browser.execute_script("""
            const c = document.getElementById('loss-chart'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 200 && d[i] < 120) n++; return n;""")
        assert coloured > 50
        shot = Path(os.environ.get("GPTSWARM_SCREENSHOT", tmp_path / "status.png"))
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        browser.set_window_size(400, 900)  # a phone: still readable, no horizontal page scroll
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    finally:
        browser.quit()

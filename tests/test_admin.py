"""The operator's commands on a state directory: `gptswarm quarantine` and `gptswarm rollback`."""

from conftest import run_cli
from gptswarm.coordinator.ledger import Ledger
from gptswarm.coordinator.run import new_run


def test_quarantine_list_and_lift(tmp_path):
    sd = tmp_path / "run"
    new_run(sd, task="addition", model="gpt-nano")
    ledger = Ledger(sd / "ledger.sqlite", lease_seconds=60, heartbeat_interval=1.0, quarantine_after=2)
    ledger.start_round(0, "h")
    w, _, _ = ledger.add_worker(name="mallory", device="cpu", peer_id="QmM", current_round=0, round_started=False)
    for r in (0, 1):
        ledger.commit_round(r, included={}, excluded={w: "flagged: left out"}, flagged={w}, theta_hash="h",
                            averaging_seconds=1)
    ledger.close()
    r = run_cli("quarantine", "--state-dir", sd)
    assert r.returncode == 0 and w in r.stdout and "flagged in 2 of its last 2 rounds" in r.stdout
    r = run_cli("quarantine", "--state-dir", sd, "--lift", w)
    assert r.returncode == 0 and "lifted" in r.stdout
    assert "no worker is quarantined" in run_cli("quarantine", "--state-dir", sd).stdout
    r = run_cli("quarantine", "--state-dir", sd, "--lift", w)
    assert r.returncode == 1 and r.stderr.strip() == f"Error: worker {w} is not quarantined (see `gptswarm quarantine --state-dir {sd}`)"


def test_rollback_asks_for_a_kept_round(tmp_path):
    sd = tmp_path / "run"
    new_run(sd, task="addition", model="gpt-nano")
    r = run_cli("rollback", "--state-dir", sd, "--to-round", "7")
    assert r.returncode == 1 and r.stderr.strip() == "Error: no checkpoint of round 7 is kept; kept rounds: 0"
    r = run_cli("rollback", "--state-dir", sd, "--to-round", "0")
    assert r.returncode == 0 and "requested" in r.stdout
    ledger = Ledger(sd / "ledger.sqlite", lease_seconds=60, heartbeat_interval=1.0)
    assert ledger.get_meta("rollback_to") == 0
    ledger.close()
    r = run_cli("rollback", "--state-dir", tmp_path / "nothing", "--to-round", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr

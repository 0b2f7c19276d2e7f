"""A round commits all or nothing: the coordinator's commit step, in process, with the failures
injected at its boundaries (a poisoned average, a ledger that fails mid-commit, a crash between
the ledger's commit and checkpoints/latest moving)."""

import os

import pytest
import torch

from gptswarm.coordinator.config import CoordinatorConfig
from gptswarm.coordinator.ledger import Ledger
from gptswarm.coordinator.run import new_run
from gptswarm.coordinator.gate import RoundRejected
from gptswarm.coordinator.server import Coordinator
from gptswarm.rounds.averaging import Outcome
from gptswarm.rounds.theta import kept, latest_dir, load_theta, round_dir, theta_hash, theta_views


class BrokenLedger(Ledger):
    def commit_round(self, *args, **kwargs):
        raise RuntimeError("disk full")


@pytest.fixture
def coord(tmp_path):
    sd = tmp_path / "run"
    new_run(sd, task="addition", model="gpt-nano", tokens_per_round=100, max_tokens=10**6)
    c = Coordinator(sd, CoordinatorConfig())
    worker_id, _, _ = c.ledger.add_worker(name="w", device="cpu", peer_id="QmW", current_round=0, round_started=False)
    lease = c.ledger.lease(worker_id, 0)
    c.ledger.clock = lambda: 10**10  # long after the round began: any claim is possible in time
    c.ledger.claim(worker_id, 0, {lease["lease_id"]: 100})
    yield c, worker_id
    c.gate.close(timeout=60)  # as shutdown() does: no evaluation thread outlives the test
    c.ledger.close()


def average(c, value):
    return Outcome(True, {k: torch.full_like(v, value) for k, v in c.rounds.theta.items()}, {})


def state(c):
    v = c.round_view()
    return v.round, v.theta_hash, v.tokens_trained, theta_hash(c.rounds.theta), os.readlink(latest_dir(c.state_dir))


def test_a_poisoned_average_moves_nothing(coord):
    c, w = coord
    before = state(c)
    outcome = average(c, float("nan"))
    outcome.included = {w: 100}
    with pytest.raises(RoundRejected, match="non-finite"):
        c.rounds.commit(0, outcome, 1.0)
    assert state(c) == before
    assert not round_dir(c.state_dir, 1).exists()
    assert c.ledger.round_rows(0)[0]["state"] == "training" and c.ledger.get_meta("tokens_trained") is None


def test_a_failed_ledger_commit_leaves_the_previous_round(coord, tmp_path):
    c, w = coord
    before = state(c)
    c.ledger.__class__ = BrokenLedger
    outcome = average(c, 0.01)
    outcome.included = {w: 100}
    with pytest.raises(RuntimeError, match="disk full"):
        c.rounds.commit(0, outcome, 1.0)
    assert state(c) == before  # in memory
    assert not round_dir(c.state_dir, 1).exists()  # and on disk
    model, _, meta, _ = load_theta(latest_dir(c.state_dir))
    assert meta["round"] == 0 and meta["tokens_trained"] == 0


def test_a_commit_moves_everything_at_once_and_survives_a_crash(coord):
    c, w = coord
    old = theta_hash(c.rounds.theta)
    outcome = average(c, 0.01)
    outcome.included = {w: 100}
    c.rounds.commit(0, outcome, 1.0)
    v = c.round_view()
    assert v.round == 1 and v.tokens_trained == 100 and v.theta_hash == theta_hash(c.rounds.theta) != old
    assert os.readlink(latest_dir(c.state_dir)) == "round-000001"
    assert c.ledger.round_rows(1)[1]["theta_hash"] == v.theta_hash and c.ledger.get_meta("tokens_trained") == 100
    # a crash between the ledger's commit and `latest` moving: the restart follows the ledger
    latest = latest_dir(c.state_dir)
    latest.unlink()
    latest.symlink_to("round-000000")
    c.ledger.close()
    again = Coordinator(c.state_dir, CoordinatorConfig())
    try:
        w = again.round_view()
        assert w.round == 1 and w.theta_hash == v.theta_hash and w.tokens_trained == 100
        assert os.readlink(latest_dir(c.state_dir)) == "round-000001"
    finally:
        again.ledger.close()


def test_the_safety_gate_takes_back_a_round_whose_loss_jumps(coord):
    """Evaluation runs off the round's critical path: the round commits, and once its theta is
    evaluated and found ruinous, the round is rejected and the run goes back to its starting theta."""
    c, w = coord
    good = average(c, 0.001)
    good.included = {w: 100}
    c.rounds.commit(0, good, 1.0)
    assert c.gate.wait(120)
    val_loss = c.round_view().val_loss
    assert c.ledger.round_rows(0)[0]["val_loss"] is not None and val_loss is not None
    assert load_theta(round_dir(c.state_dir, 1))[2]["val_loss"] == val_loss  # in the checkpoint too
    before = state(c)
    torch.manual_seed(0)
    wrecked = Outcome(True, {k: torch.randn_like(v) * 2 for k, v in c.rounds.theta.items()}, {w: 100})  # finite, ruinous
    wrecked.included = {w: 100}
    c.rounds.commit(1, wrecked, 1.0)
    assert c.round_view().round == 2 and c.round_view().theta_hash != before[1]  # committed, not yet judged
    assert c.gate.wait(120)
    row = c.ledger.round_rows(1)[1]
    assert row["state"] == "rejected" and "above the median of the last 1 evaluated rounds" in row["detail"]
    assert c.ledger.get_meta("rollback_to") == 1
    c.rounds.apply_rollback()  # the round loop does this between two rounds
    v = c.round_view()
    assert v.theta_hash == before[1] and theta_hash(c.rounds.theta) == before[3] and v.round == 3
    assert os.readlink(latest_dir(c.state_dir)) == "round-000001"


def test_rollback_to_a_kept_round(coord):
    c, w = coord
    for r, value in enumerate((0.001, 0.002)):
        outcome = average(c, value)
        outcome.included = {w: 100}
        c.rounds.commit(r, outcome, 1.0)
    model1, _, meta1, _ = load_theta(round_dir(c.state_dir, 1))
    c.ledger.request_rollback(1)
    c.rounds.apply_rollback()
    v = c.round_view()
    assert v.round == 3 and v.checkpoint_round == 1 and v.tokens_trained == meta1["tokens_trained"] == 100
    assert v.theta_hash == theta_hash(theta_views(model1))
    assert os.readlink(latest_dir(c.state_dir)) == "round-000001"
    rows = c.ledger.round_rows(2, 3)
    assert rows[2]["state"] == "failed" and "rolled back" in rows[2]["detail"] and rows[3]["theta_hash"] == v.theta_hash
    assert c.ledger.get_meta("rollback_to") is None
    files, round_, digest = c.open_checkpoint()  # what a worker downloads now
    for _, f in files:
        f.close()
    assert round_ == 3 and digest == v.theta_hash


def test_checkpoints_are_kept_at_exponential_spacing():
    assert kept(range(100), 99) == {0, 1, 2, 4, 8, 16, 32, 64, 97, 98, 99}
    assert kept([0, 1, 2, 3], 1) == {0, 1, 2, 3}


def test_the_safety_gate_cannot_stall_a_run(coord):
    """Near zero loss, honest rounds can land well above the best one: the gate refuses a jump, but a
    level that holds for three rounds becomes the baseline (rejected rounds count in the median)."""
    c, _ = coord
    with c.ledger.tx() as db:
        db.executemany("INSERT OR REPLACE INTO rounds (round, state, val_loss) VALUES (?, 'done', 0.0001)",
                       [(r,) for r in range(10, 15)])
    for r in range(15, 18):
        with pytest.raises(RoundRejected, match="median of the last 5"):
            c.gate.check(0.15)
        with c.ledger.tx() as db:  # committed, then evaluated and rejected
            db.execute("INSERT OR REPLACE INTO rounds (round, state) VALUES (?, 'done')", (r,))
        c.ledger.reject_late(r, "validation loss jumped", 0.15)
    c.gate.check(0.15)  # three in a row: that is where training is now
    with pytest.raises(RoundRejected):
        c.gate.check(5.0)  # a jump from there is still refused

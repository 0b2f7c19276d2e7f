"""How long a round lasts, and a swarm that stops learning: a round ends at the run's tokens per
round or at --inner-steps for every worker training in it, whichever is more; rounds that fail or
leave most values out, several in a row, turn the health into a warning with the reason, an event
and a /metrics gauge. In process, on a real ledger and a real coordinator (not started)."""

import time

import pytest

from gptswarm.coordinator.config import CoordinatorConfig
from gptswarm.coordinator.metrics import exposition, registry
from gptswarm.coordinator.run import INNER_STEPS, RunSettings, new_run
from gptswarm.coordinator.server import Coordinator
from gptswarm.coordinator.status import NOT_LEARNING_ROUNDS, snapshot



@pytest.mark.parametrize("workers", [2, 10])
def test_the_readmes_operator_example_trains_the_inner_steps_per_worker(workers):
    """gpt-mini, --tokens-per-round 200000, the default batch of 64 sequences of 256 tokens: by tokens
    alone 2 workers would train about 6 steps each per round, 10 workers about one."""
    s = RunSettings("r", {}, {}, {}, tokens_per_round=200_000, max_tokens=10**9)
    step = 64 * 256
    assert 200_000 / (workers * step) < 7
    target = s.round_target(0, workers=workers, step_tokens=step)
    assert target / (workers * step) >= INNER_STEPS
    assert RunSettings("r", {}, {}, {}, tokens_per_round=200_000, inner_steps=0).round_target(
        0, workers=workers, step_tokens=step) == 200_000  # 0: tokens alone, as before


@pytest.fixture
def coord(tmp_path):
    sd = tmp_path / "run"
    new_run(sd, task="addition", model="gpt-nano", tokens_per_round=100, max_tokens=10**7, inner_steps=8)
    c = Coordinator(sd, CoordinatorConfig())
    now = [time.time()]
    c.ledger.clock = lambda: now[0]
    c.tick = lambda seconds: now.__setitem__(0, now[0] + seconds)
    yield c
    c.gate.close(timeout=60)
    c.ledger.close()


def join(c, name):
    worker_id, _, _ = c.ledger.add_worker(name=name, device="cpu", peer_id=f"Qm{name}", current_round=0,
                                          round_started=False)
    return worker_id, c.ledger.lease(worker_id, 0)["lease_id"]


def test_a_round_lasts_the_inner_steps_of_every_worker_training_in_it(coord):
    c = coord
    assert c.rounds.step_tokens == 64 * 6  # 64 sequences of a 2-digit sum's 6 input tokens
    a, lease_a = join(c, "a")
    b, lease_b = join(c, "b")
    c.tick(2)  # the workers are still online, and any claim was possible in time
    c.ledger.claim(a, 0, {lease_a: 200})
    c.ledger.claim(b, 0, {lease_b: 200})
    assert not c.rounds.due()  # 400 tokens are past --tokens-per-round, but not 8 steps for each of two workers
    assert c.round_view().workers == 2 and c.round_target() == 8 * 64 * 6 * 2
    c.ledger.claim(a, 0, {lease_a: 8 * 64 * 6})
    assert not c.rounds.due()
    c.ledger.claim(b, 0, {lease_b: 8 * 64 * 6})
    assert c.rounds.due()
    # a worker that joins now waits for the next round: it does not lengthen this one
    c.ledger.add_worker(name="late", device="cpu", peer_id="Qmlate", current_round=0, round_started=True)
    assert c.rounds.due() and c.round_view().workers == 2


def test_rounds_that_fail_or_leave_most_values_out_raise_a_warning(coord):
    c = coord
    join(c, "a")
    assert snapshot(c)["health"]["state"] != "warning"
    c.ledger.fail_round(0, excluded={}, detail="no contribution with tokens reached the average", left_out=0.9)
    c.rounds.check_learning()
    c.ledger.commit_round(1, included={}, excluded={}, theta_hash="h", averaging_seconds=1.0, left_out=0.6)
    c.rounds.check_learning()
    assert snapshot(c)["health"]["state"] != "warning"  # two in a row are not yet a trend
    assert not c.ledger.count_events("not_learning")
    c.ledger.fail_round(2, excluded={}, detail="no contribution with tokens reached the average", left_out=1.0)
    c.rounds.check_learning()
    health = snapshot(c)["health"]
    assert health["state"] == "warning"
    assert f"the last {NOT_LEARNING_ROUNDS} rounds failed (2) or left most values out of the average (1)" in \
        health["reason"] and "round 2 failed: no contribution" in health["reason"]
    assert c.ledger.count_events("not_learning") == 1
    metrics = exposition(registry(c)).decode()
    assert f"gptswarm_rounds_not_learning {NOT_LEARNING_ROUNDS}.0" in metrics
    assert "gptswarm_round_left_out_fraction 1.0" in metrics
    assert 'gptswarm_health{state="warning"} 1.0' in metrics
    # once more: the event is said once per streak, the warning lasts
    c.ledger.fail_round(3, excluded={}, detail="averaging took longer than 60 s")
    c.rounds.check_learning()
    assert c.ledger.count_events("not_learning") == 1 and snapshot(c)["health"]["state"] == "warning"
    # a round that learns ends it
    c.ledger.commit_round(4, included={}, excluded={}, theta_hash="h", averaging_seconds=1.0, left_out=0.01)
    assert snapshot(c)["health"]["state"] != "warning"
    assert "gptswarm_rounds_not_learning 0.0" in exposition(registry(c)).decode()

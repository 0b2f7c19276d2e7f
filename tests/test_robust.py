"""A hostile or broken worker cannot wreck the model: a real swarm (a coordinator, two honest
workers) joined by one hostile worker (bench/hostile_worker.py) per attack. The robust aggregation
leaves it out and flags it, the quarantine shuts it out, and the model trains as in a clean run."""

import json
import statistics
import urllib.request

import pytest

from swarm import coordinator, hostile_worker, join_address, ledger, wait_until, worker

ROUNDS = 10  # committed rounds to compare at
ATTACKS = ["flip20", "scale100", "noise", "const", "replay", "nan"]


def done(sd):
    return ledger(sd, "SELECT round, val_loss FROM rounds WHERE state = 'done' ORDER BY round")


def quarantined(sd):
    return ledger(sd, "SELECT 1 FROM workers WHERE name = 'hostile' AND quarantined_at IS NOT NULL")


def run(tmp_path, attack=None):
    """A swarm of two honest workers; the hostile one joins once the first round is done (as an
    attacker joins a running swarm), and the run goes on for ROUNDS rounds, or 3 past the hostile
    worker's quarantine. Returns (state dir, the val loss of its last rounds, the status page's workers)."""
    sd = tmp_path / "state"
    coord = coordinator(sd, "--replay-fraction", "0")  # the robust rule's judgement alone (a replay would
    # quarantine an attacker it drew whatever its flags: tests/test_replay.py)
    procs = [coord]
    try:
        join = join_address(coord)
        procs += [worker(join, "honest-1"), worker(join, "honest-2")]
        wait_until(lambda: done(sd), 120, "a first round")
        rounds = ROUNDS
        if attack:
            procs.append(hostile_worker(join, "hostile", attack))
            wait_until(lambda: quarantined(sd), 180, "the hostile worker's quarantine")
            rounds = max(ROUNDS, len(done(sd)) + 3)
        wait_until(lambda: len(done(sd)) >= rounds, 240, f"{rounds} rounds")
        page = coord.wait_for(r"status page: (http://\S+)").group(1)
        with urllib.request.urlopen(page + "api/v1/status", timeout=10) as r:
            workers = {w["name"]: w for w in json.loads(r.read())["workers"]}
        for p in procs[1:]:
            p.kill()
        coord.stop()  # a clean stop evaluates the last round (evaluation runs after each commit)
    finally:
        for p in procs:
            p.kill()
    # the median of the last 5 evaluated rounds: a round the epoch's end cut short (a few thousand
    # tokens) can overshoot, whoever is in the swarm, and the addition task's loss can halve in one
    # round when the model finds the rule (met: clean 1.79 then 0.89, beside attacked runs at 1.33)
    return sd, statistics.median([v for _, v in done(sd) if v is not None][-5:]), workers


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    sd, val_loss, workers = run(tmp_path_factory.mktemp("clean"))
    assert not any(w["quarantined"] or w["refused"] for w in workers.values())
    # a clean run flags nobody, quarantines nobody, refuses nothing, rejects no round for its content
    # (the validation gate may take back a short round's momentum overshoot: docs/operators.md)
    assert not ledger(sd, "SELECT round, worker_id, reason FROM contributions WHERE flagged = 1 OR "
                          "(included = 0 AND reason LIKE '%flagged%')")
    assert not ledger(sd, "SELECT 1 FROM workers WHERE quarantined_at IS NOT NULL")
    assert not ledger(sd, "SELECT kind, last_detail FROM refusals")
    assert not ledger(sd, "SELECT round, detail FROM rounds WHERE state = 'rejected' AND detail NOT LIKE 'validation loss%'")
    return val_loss


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_hostile_worker_is_left_out_flagged_and_quarantined(attack, tmp_path, clean):
    sd, val_loss, workers = run(tmp_path, attack)
    (hostile,), = ledger(sd, "SELECT id FROM workers WHERE name = 'hostile'")
    rounds = ledger(sd, "SELECT c.round, r.state, c.included, c.flagged, c.reason, (SELECT COUNT(*) FROM contributions "
                        "h WHERE h.round = c.round AND h.worker_id != c.worker_id AND h.included = 1) AS honest, "
                        "(SELECT COUNT(*) FROM contributions h WHERE h.round = c.round AND h.worker_id != c.worker_id "
                        "AND h.included = 1 AND 4 * h.tokens >= c.tokens) AS trained "
                        "FROM contributions c JOIN rounds r ON r.round = c.round WHERE c.worker_id = ? "
                        "AND c.included IS NOT NULL ORDER BY c.round", (hostile,))
    # every round it took part in (its first honest one aside, for replay) left it out and, where
    # the round stood, flagged it; for an attack only its direction gives away, in the rounds it
    # faced both honest workers, each having trained at least a quarter of what it claims (a pair
    # cannot outvote each other: docs/architecture.md, the breakdown point; and an honest member
    # back from a resynchronization with one step's pseudo-gradient, 124 tokens, is noise itself:
    # met in a test run), all but one (a direction-only attack that partly agrees with honest work,
    # a constant vector where honest parts have a mean, goes in clipped in a round: met once in
    # twelve runs; it is flagged in the next, and quarantined all the same)
    need = 2 if attack in ("noise", "const") else 1  # only direction tells these: with one honest member, no
    if need == 2:
        rounds = [r[:5] + r[6:] for r in rounds]
    else:
        rounds = [r[:6] for r in rounds]
    if attack == "replay":  # a replay shows from the round after one that recorded what it sent
        recorded = {r[0] for r in rounds if r[1] == "done"}
        rounds_judged = [r for r in rounds if r[0] - 1 in recorded]
    else:
        rounds_judged = rounds
    # (a round that did not commit is judged too, where it could tell: a direction-only attacker beside
    # one honest worker goes in clipped, and a round the safety gate then rejects did its job)
    judged = [r[:5] for r in rounds_judged if r[5] >= need or (r[1] != "done" and need == 1)]
    missed = [r for r in judged if not (r[2] == 0 and (r[3] == 1 or r[1] != "done"))]
    assert len(missed) <= (1 if need == 2 else 0), (missed, [r[:4] + r[5:] for r in rounds])
    reason = "non-finite" if attack == "nan" else "flagged: left out of"
    assert all(reason in why for _, state, _, flag, why in judged if state == "done" and flag), rounds
    # twice flagged: quarantined, no more leases, no more rounds
    (quarantine,), = ledger(sd, "SELECT quarantine_reason FROM workers WHERE id = ?", (hostile,))
    assert quarantine and "flagged in 2" in quarantine
    # flagged wherever it took part, it is quarantined after its second round (replay: third); an
    # attack only its direction gives away goes in, clipped, in two-member rounds (one honest worker
    # late), which spread its flags over the quarantine window: it is quarantined all the same
    if need == 1:
        took_part = [r[1] for r in rounds if r[1] == "done" and r[5] >= 2]
        assert len(took_part) <= (3 if attack == "replay" else 2), rounds
    assert "quarantined" in [k for (k,) in ledger(sd, "SELECT kind FROM events WHERE worker_id = ?", (hostile,))]
    shown = workers["hostile"]  # on the status page, with the reason
    assert shown["quarantined"] and shown["state"] == "quarantined" and "flagged in 2" in shown["reason"]
    # the honest workers were never flagged, and the model trained as in the clean run
    assert not ledger(sd, "SELECT round, worker_id, reason FROM contributions WHERE worker_id != ? AND flagged = 1",
                      (hostile,))
    assert val_loss <= clean + 0.15, (val_loss, clean)

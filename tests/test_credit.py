"""Credit only for work done: a real swarm (a coordinator, two honest workers) joined by a worker that
claims every token of its leases but does a fraction of the work (bench/hostile_worker.py). Its
contributions score low against the honest ones' (coordinator/scoring.py): it is flagged within 5
rounds, credited less than a fifth of its claims, and quarantined; the honest workers are never
flagged and keep their credit. The scores are on the status page and in /metrics, and `gptswarm
credits` exports the table."""

import csv
import io
import json

import pytest
from conftest import run_cli
from swarm import (
    coordinator,
    hostile_worker,
    join_address,
    ledger,
    status_and_metrics,
    wait_until,
    worker,
)

JOINED_ROUNDS = 5  # it must be flagged within this many of its rounds


def rows(sd, sql, args=()):
    return ledger(sd, sql, args)


@pytest.mark.parametrize("attack", ["lazy", "freeride"])
def test_a_worker_that_does_less_than_it_claims_is_flagged_and_barely_credited(attack, tmp_path):
    sd = tmp_path / "state"
    # scoring alone: no robust rule to catch the zeros first, no replay to quarantine the cheat before its score
    coord = coordinator(sd, "--aggregation", "mean", "--replay-fraction", "0")
    procs = [coord]
    try:
        join = join_address(coord)
        procs += [worker(join, "honest-1"), worker(join, "honest-2")]
        wait_until(lambda: rows(sd, "SELECT 1 FROM rounds WHERE state = 'done'"), 120, "a first round")
        procs.append(hostile_worker(join, "cheat", attack))
        wait_until(lambda: rows(sd, "SELECT 1 FROM workers WHERE name = 'cheat' AND quarantined_at IS NOT NULL"), 240,
                   "the cheat's quarantine")
        shown, metrics = status_and_metrics(coord)
    finally:
        for p in procs:
            p.kill()
    (cheat,), = rows(sd, "SELECT id FROM workers WHERE name = 'cheat'")
    # the rounds it took part in: those that committed with its contribution in the average; flagged
    # within JOINED_ROUNDS of those it shared with another member (alone in its group, as CI met for
    # three rounds while both honest workers resynchronized, nobody can score it)
    took_part = rows(sd, "SELECT c.round, c.flagged, c.tokens, c.credited, c.score, c.standing, r.group_size "
                         "FROM contributions c JOIN rounds r ON r.round = c.round WHERE c.worker_id = ? AND "
                         "r.state = 'done' AND (c.included = 1 OR c.flagged = 1) ORDER BY c.round", (cheat,))
    flagged_at = [i for i, r in enumerate(r for r in took_part if r[6] >= 2) if r[1]]
    assert flagged_at and flagged_at[0] < JOINED_ROUNDS, took_part
    claimed = sum(r[2] for r in took_part)
    credited = sum(r[3] or 0 for r in took_part)
    assert credited < 0.2 * claimed, (credited, claimed, took_part)
    # the honest workers: never flagged, credited in full or nearly
    honest = rows(sd, "SELECT w.name, SUM(c.tokens), SUM(c.credited), MAX(c.flagged) FROM contributions c JOIN workers w "
                      "ON w.id = c.worker_id WHERE w.name LIKE 'honest-%' AND c.included = 1 GROUP BY w.name")
    assert len(honest) == 2 and all(flag == 0 for *_, flag in honest), honest
    assert all(cr >= 0.8 * t for _, t, cr, _ in honest), honest
    assert not rows(sd, "SELECT 1 FROM contributions c JOIN workers w ON w.id = c.worker_id "
                        "WHERE w.name LIKE 'honest-%' AND c.flagged = 1")
    # visible: the status page and /metrics say what it scored, the event log why it is out
    assert shown["cheat"]["standing"] is not None and shown["cheat"]["standing"] < 0.25, shown["cheat"]
    assert shown["cheat"]["tokens_credited"] < 0.2 * claimed
    assert all(shown[n]["standing"] is None or shown[n]["standing"] > 0.25 for n in ("honest-1", "honest-2")), shown
    assert 'gptswarm_worker_standing{worker="cheat"}' in metrics
    assert any("scored" in (d or "") for (d,) in rows(sd, "SELECT detail FROM events WHERE worker_id = ? AND "
                                                          "kind = 'contribution_rejected'", (cheat,)))
    # the operator's export: both formats, every worker, claims and credit
    out = run_cli("credits", "--state-dir", str(sd), "--format", "csv").stdout
    table = {r["name"]: r for r in csv.DictReader(io.StringIO(out))}
    assert set(table) == {"honest-1", "honest-2", "cheat"}
    assert int(table["cheat"]["tokens_credited"]) == shown["cheat"]["tokens_credited"]
    as_json = json.loads(run_cli("credits", "--state-dir", str(sd), "--format", "json").stdout)
    assert {w["name"] for w in as_json["workers"]} == set(table)

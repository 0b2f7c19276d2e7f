"""The SQLite ledger's lease rules, with a controllable clock."""

import sqlite3

import pytest

from gptswarm.coordinator.ledger import Ledger


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def ledger(tmp_path):
    clock = Clock()
    led = Ledger(tmp_path / "ledger.sqlite", lease_seconds=60, heartbeat_interval=1.0, clock=clock)
    led.add_shards([(f"sha{i}", 100 + i) for i in range(3)])
    led.clock_ = clock
    yield led
    led.close()


def join(led, name="a"):
    return led.add_worker(name=name, device="cpu", peer_id="peer-" + name, client_mode=False, current_round=0,
                          round_started=False)[0]


def beat(ledger, worker_id, round_tokens, lease_ids=(), tps=1.0, loss=None):
    return ledger.heartbeat(worker_id, round_=0, round_tokens=round_tokens, tps=tps, state="training", reason="",
                            lease_ids=list(lease_ids), bytes_sent=0, loss=loss)


def test_wal_and_persistence(tmp_path, ledger):
    w = join(ledger)
    ledger.lease(w, 0)
    assert ledger.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    again = Ledger(tmp_path / "ledger.sqlite", lease_seconds=60, heartbeat_interval=1.0)
    assert again.shard_counts() == {"pending": 2, "leased": 1, "done": 0}
    assert again.worker(w)["name"] == "a"
    again.close()


def test_expired_lease_returns_shard_and_heartbeat_extends(ledger):
    a, b = join(ledger, "a"), join(ledger, "b")
    la = ledger.lease(a, 0)
    lb = ledger.lease(b, 0)
    assert la["shard_index"] != lb["shard_index"]
    ledger.clock_.t += 50
    deadline, lost = beat(ledger, a, 10, [la["lease_id"]], tps=5.0, loss=2.0)
    assert deadline == ledger.clock_.t + 60 and lost == []
    ledger.clock_.t += 20  # b's lease is past its deadline, a's was extended
    assert ledger.expire() == 1
    assert ledger.lease_row(lb["lease_id"])["state"] == "expired"
    assert ledger.shard(lb["shard_index"])["state"] == "pending"
    _, lost = beat(ledger, b, 0, [lb["lease_id"]])
    assert lost == [lb["lease_id"]]  # the worker learns that its lease is gone
    assert ledger.report(b, lb["lease_id"], 0, 101, 1.0) == (False, "lease expired: the shard went back to the queue")
    assert ledger.shard(lb["shard_index"])["times_done"] == 0
    assert [e["kind"] for e in ledger.query("SELECT kind FROM events")].count("lease_expired") == 1


def test_report_is_idempotent_and_checked(ledger):
    a, b = join(ledger, "a"), join(ledger, "b")
    la = ledger.lease(a, 0)
    assert ledger.report(b, la["lease_id"], 0, 100, 1.0) == (False, "unknown lease")  # not b's lease
    assert ledger.report(a, la["lease_id"], 0, 100, 1.0) == (True, "counted")
    assert ledger.report(a, la["lease_id"], 0, 100, 1.0)[0] is False
    i = la["shard_index"]
    assert ledger.shard(i)["times_done"] == 1 and ledger.shard(i)["state"] == "done"


def test_every_shard_once_per_epoch(ledger):
    a, b = join(ledger, "a"), join(ledger, "b")
    leases = [ledger.lease(a, 0) for _ in range(3)]
    assert ledger.lease(b, 0) is None  # all leased, none done: no new epoch yet
    for l in leases[:2]:
        ledger.report(a, l["lease_id"], 0, l["tokens"], 1.0)
    assert ledger.lease(b, 0) is None  # one still out
    ledger.release(a, [leases[2]["lease_id"]])
    l = ledger.lease(b, 0)
    assert l["shard_index"] == leases[2]["shard_index"] and l["epoch"] == 0
    ledger.report(b, l["lease_id"], 0, l["tokens"], 1.0)
    nxt = ledger.lease(a, 1)
    assert nxt["epoch"] == 1
    assert ledger.get_meta("epoch") == 1
    assert [r["times_done"] for r in ledger.query("SELECT times_done FROM shards ORDER BY idx")] == [1, 1, 1]


def test_leave_returns_leases(ledger):
    a = join(ledger)
    ledger.lease(a, 0)
    ledger.lease(a, 0)
    ledger.leave(a)
    assert ledger.shard_counts()["pending"] == 3
    assert ledger.worker(a)["state"] == "offline"


def test_round_accounting(ledger):
    a, b = join(ledger, "a"), join(ledger, "b")
    ledger.start_round(0, "h0")
    beat(ledger, a, 300)
    beat(ledger, a, 200)  # cumulative: a late smaller figure is ignored
    beat(ledger, b, 100)
    assert ledger.round_tokens(0) == 400
    ledger.finish_round(0, state="done", included={a: (300, "")}, excluded={b: (100, "non-finite values")},
                        averaging_seconds=1.5)
    assert ledger.get_meta("tokens_trained") == 300
    assert ledger.included(0, a) and not ledger.included(0, b)
    assert ledger.worker(a)["tokens_contributed"] == 300 and ledger.worker(b)["tokens_contributed"] == 0
    assert ledger.query("SELECT detail FROM events WHERE kind = 'contribution_rejected'")[0]["detail"] == \
        "round 0: non-finite values"


def test_sessions_are_stored_hashed(ledger):
    wid, session = ledger.add_worker(name="x", device="cpu", peer_id="p", client_mode=True, current_round=3,
                                     round_started=True)
    assert ledger.worker_for_session(session)["id"] == wid
    assert ledger.worker(wid)["eligible_round"] == 4  # joined mid-round: waits for the next
    raw = sqlite3.connect(ledger.path).execute("SELECT group_concat(session_hash) FROM workers").fetchone()[0]
    assert session not in raw


def test_lease_order_is_a_seeded_shuffle_per_epoch(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", lease_seconds=60, heartbeat_interval=1.0)
    led.add_shards([(f"s{i}", 10) for i in range(40)])
    w = join(led)
    order = []
    for epoch in range(2):
        for _ in range(40):
            l = led.lease(w, 0)
            order.append(l["shard_index"])
            led.report(w, l["lease_id"], 0, 10, 1.0)
    first, second = order[:40], order[40:]
    assert sorted(first) == sorted(second) == list(range(40))  # each epoch: every shard once
    assert first != list(range(40)) and first != second  # not the file's order, and new each epoch
    again = Ledger(tmp_path / "m.sqlite", lease_seconds=60, heartbeat_interval=1.0)
    again.add_shards([(f"s{i}", 10) for i in range(40)])
    assert [again.lease(w, 0)["shard_index"] for _ in range(5)] == first[:5]  # reproducible


def test_a_failed_transaction_changes_nothing(ledger):
    with pytest.raises(RuntimeError):
        with ledger.tx() as db:
            db.execute("UPDATE shards SET state = 'done'")
            raise RuntimeError("crash mid-transaction")
    assert ledger.shard_counts() == {"pending": 3, "leased": 0, "done": 0}


def test_lease_holders_since_counts_whoever_can_bring_tokens(ledger):
    """The round's averaging group closes once these workers are in: anyone who held a lease since
    the round started (in progress, or closed since), never someone who left or only leased before."""
    a, b, c, d = (join(ledger, n) for n in "abcd")
    la = ledger.lease(a, 0)  # a: leased in the previous round, reports it after the round started
    lc = ledger.lease(c, 0)  # c: leased and released before the round started
    ledger.release(c, [lc["lease_id"]])
    ledger.clock_.t += 10
    start = ledger.clock_.t
    assert ledger.lease_holders_since(start) == 1  # a's lease is still in progress
    ledger.clock_.t += 1
    ledger.report(a, la["lease_id"], 0, la["tokens"], 2.0)
    lb = ledger.lease(b, 1)  # b: leased in this round, then gave the shard back (paused)
    ledger.release(b, [lb["lease_id"]])
    assert ledger.lease_holders_since(start) == 2  # a and b; not c, not d (never leased)
    ledger.leave(b)
    assert ledger.lease_holders_since(start) == 1
    assert ledger.lease_holders_since(ledger.clock_.t + 1) == 0

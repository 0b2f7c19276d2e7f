"""The SQLite ledger's lease and credit rules, with a controllable clock."""

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
    led = Ledger(tmp_path / "ledger.sqlite", lease_seconds=60, heartbeat_interval=1.0, max_leases=2, clock=clock)
    led.add_shards([(f"sha{i}", 100 + i) for i in range(3)])
    led.start_round(0, "h0")
    led.clock_ = clock
    yield led
    led.close()


def join(led, name="a"):
    return led.add_worker(name=name, device="cpu", peer_id="peer-" + name, current_round=0, round_started=False)[0]


def beat(ledger, worker_id, claims=None, lease_ids=(), tps=1.0, loss=None, round_=0, current=0):
    """A heartbeat claiming {lease: tokens trained on it in round_}."""
    return ledger.heartbeat(worker_id, current_round=current, round_=round_, lease_tokens=claims or {}, tps=tps,
                            state="training", reason="", lease_ids=list(lease_ids), bytes_sent=0, loss=loss)


def refusals(ledger, worker_id):
    return {r["kind"]: r["n"] for r in ledger.query("SELECT kind, n FROM refusals WHERE worker_id = ?", (worker_id,))}


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
    deadline, lost = beat(ledger, a, {la["lease_id"]: 10}, [la["lease_id"]], tps=5.0, loss=2.0)
    assert deadline == ledger.clock_.t + 60 and lost == []
    ledger.clock_.t += 20  # b's lease is past its deadline, a's was extended
    assert ledger.expire() == 1
    assert ledger.lease_row(lb["lease_id"])["state"] == "expired"
    assert ledger.shard(lb["shard_index"])["state"] == "pending"
    _, lost = beat(ledger, b, {}, [lb["lease_id"]])
    assert lost == [lb["lease_id"]]  # the worker learns that its lease is gone
    assert ledger.report(b, lb["lease_id"], 0, 1.0)[0] is False
    assert ledger.shard(lb["shard_index"])["times_done"] == 0
    assert [e["kind"] for e in ledger.query("SELECT kind FROM events")].count("lease_expired") == 1


def test_claims_are_clamped_to_what_the_leases_cover(ledger):
    a, b = join(ledger, "a"), join(ledger, "b")
    la, lb = ledger.lease(a, 0), ledger.lease(b, 0)
    ledger.clock_.t += 5
    l = la["lease_id"]
    beat(ledger, a, {l: 10**12})  # far more than a 100-token lease covers
    assert ledger.round_tokens(0) == la["tokens"]
    beat(ledger, a, {l: 2**63 - 1})  # and the largest claim changes nothing either
    beat(ledger, a, {l: 50})  # cumulative: a smaller later figure is ignored
    beat(ledger, a, {lb["lease_id"]: 100})  # b's lease, not a's
    assert ledger.round_tokens(0) == la["tokens"]
    beat(ledger, a, {l: 70}, round_=5, current=0)  # a heartbeat for a future round counts nowhere
    assert ledger.round_tokens(5) == 0 and ledger.round_tokens(0) == la["tokens"]
    assert refusals(ledger, a) == {"tokens_clamped": 3, "future_round": 1}
    kinds = [e["detail"].split(":")[0] for e in ledger.query("SELECT detail FROM events WHERE kind = 'refused'")]
    assert kinds == ["tokens_clamped", "future_round"]  # one event per kind and minute, each counted


def test_claims_are_clamped_to_what_could_have_been_trained(tmp_path):
    clock = Clock()
    led = Ledger(tmp_path / "l.sqlite", lease_seconds=60, heartbeat_interval=1.0, max_tokens_per_second=10, clock=clock)
    led.add_shards([("s", 1000)])
    led.start_round(0, "h")
    a = join(led)
    la = led.lease(a, 0)
    clock.t += 3
    beat(led, a, {la["lease_id"]: 500})  # 3 s at 10 tokens/s at the most
    assert led.round_tokens(0) == 30


def test_credit_marks_leases_done_and_reports_are_checked(ledger):
    a, b = join(ledger, "a"), join(ledger, "b")
    la = ledger.lease(a, 0)
    lb = ledger.lease(a, 0)
    ledger.clock_.t += 1
    ledger.finish_leases(a, [la["lease_id"]], current_round=0, round_=0,
                         lease_tokens={la["lease_id"]: la["tokens"], lb["lease_id"]: 40})
    assert ledger.lease_row(la["lease_id"])["state"] == "trained"
    assert ledger.report(a, la["lease_id"], 0, 1.0)[0] is False  # not credited yet: no report
    ledger.commit_round(0, included={a: la["tokens"] + 40}, excluded={}, theta_hash="h1", averaging_seconds=1.0)
    assert ledger.lease_row(la["lease_id"])["state"] == "done"
    assert ledger.shard(la["shard_index"])["state"] == "done" and ledger.shard(la["shard_index"])["times_done"] == 1
    assert ledger.lease_row(lb["lease_id"])["credited"] == 40 and ledger.lease_row(lb["lease_id"])["state"] == "active"
    assert ledger.report(b, la["lease_id"], 0, 1.0) == (False, "unknown lease")  # not b's lease
    assert ledger.report(a, la["lease_id"], 1, 1.0)[0] is False  # not that round's
    assert ledger.report(a, la["lease_id"], 0, 1.0) == (True, "counted")
    assert ledger.report(a, la["lease_id"], 0, 1.0) == (False, "duplicate report: already counted")
    assert ledger.report(a, lb["lease_id"], 0, 1.0)[0] is False  # only partly covered
    assert refusals(ledger, b) == {"report_refused": 1} and refusals(ledger, a) == {"report_refused": 3}
    # in the next round, the half-trained lease covers only what is left of it
    ledger.clock_.t += 1
    beat(ledger, a, {lb["lease_id"]: 10**6}, round_=1, current=1)
    assert ledger.round_tokens(1) == lb["tokens"] - 40
    assert ledger.get_meta("tokens_trained") == la["tokens"] + 40
    assert ledger.worker(a)["tokens_contributed"] == la["tokens"] + 40


def test_finishing_a_lease_needs_the_tokens_and_frees_the_cap(ledger):
    a = join(ledger)
    l1, l2 = ledger.lease(a, 0), ledger.lease(a, 0)
    assert "at most 2 active lease(s)" in ledger.lease(a, 0)  # hoarding: the cap
    ledger.clock_.t += 1
    ledger.finish_leases(a, [l1["lease_id"], l2["lease_id"]], current_round=0, round_=0,
                         lease_tokens={l1["lease_id"]: l1["tokens"], l2["lease_id"]: 5})
    assert ledger.lease_row(l1["lease_id"])["state"] == "trained"
    assert ledger.lease_row(l2["lease_id"])["state"] == "active"  # its tokens were not claimed
    assert refusals(ledger, a) == {"lease_cap": 1, "finish_refused": 1}
    assert isinstance(ledger.lease(a, 0), dict)  # one active again: one more lease


def test_a_finish_sent_in_a_round_that_ended_on_its_way_is_not_refused(ledger):
    """A round can commit, fail or be rolled back between a worker building its lease request and the
    coordinator reading it (short rounds, a rollback): its claims cannot count any more, and its
    finished leases stay active, unrefused; a lie in the current round is still refused."""
    a = join(ledger)
    lease = ledger.lease(a, 0)
    ledger.clock_.t += 1
    ledger.finish_leases(a, [lease["lease_id"]], current_round=1, round_=0, lease_tokens={lease["lease_id"]: 10**6})
    assert ledger.lease_row(lease["lease_id"])["state"] == "active" and ledger.round_tokens(0) == 0
    assert refusals(ledger, a) == {}
    ledger.finish_leases(a, [lease["lease_id"]], current_round=1, round_=1, lease_tokens={})
    assert refusals(ledger, a) == {"finish_refused": 1}


def test_a_claim_read_after_its_round_committed_changes_nothing(ledger):
    """The coordinator reads the round keeper's view, then asks the ledger: a heartbeat for round 0
    that reaches the ledger after round 0's commit (the view not yet moved) is late, not a lie. It
    neither refuses nor rewrites the committed round's tokens (met in a test swarm: a refused honest
    claim, and the worker's committed contribution set to 0 tokens)."""
    a = join(ledger)
    lease = ledger.lease(a, 0)
    ledger.clock_.t += 1
    beat(ledger, a, {lease["lease_id"]: lease["tokens"]})
    ledger.commit_round(0, included={a: lease["tokens"]}, excluded={}, theta_hash="h1", averaging_seconds=1)
    beat(ledger, a, {lease["lease_id"]: lease["tokens"]}, round_=0, current=0)  # the view still said round 0
    assert refusals(ledger, a) == {}
    assert ledger.query("SELECT tokens, credited FROM contributions WHERE round = 0")[0] == {
        "tokens": lease["tokens"], "credited": lease["tokens"]}


def test_scores_scale_credit_and_a_flag_takes_back_the_rounds_it_judged(ledger):
    a, b = join(ledger, "a"), join(ledger, "b")
    for r in range(4):
        # (ratio, leased, off, standing, factor, flagged): b does a tenth of the work; in round 2 it is
        # alone (nobody scores it: its standing still scales its credit)
        flagged = r == 3
        scores = {a: (1.0, 1e-3, 1e-3, 1.0, 1.0, False), b: (0.1, 1e-4, 1e-4, 0.1, 0.0 if flagged else 0.2, flagged)}
        if r == 2:
            scores = {b: (None, None, None, 0.1, 0.2, False)}
        ledger.commit_round(r, included={a: 100} if flagged else {a: 100, b: 100} if r != 2 else {b: 100},
                            excluded={b: "flagged: scored"} if flagged else {}, flagged={b} if flagged else set(),
                            theta_hash=f"h{r + 1}", averaging_seconds=1, scores=scores,
                            revoke=[b] if flagged else [], revoke_rounds=4)
    assert ledger.worker(a)["tokens_credited"] == 300 == ledger.worker(a)["tokens_contributed"]
    assert ledger.worker(b)["tokens_contributed"] == 300 and ledger.worker(b)["tokens_credited"] == 0
    assert [r["credited"] for r in ledger.query("SELECT credited FROM contributions WHERE worker_id = ? "
                                                "ORDER BY round", (b,))] == [0, 0, 0, None]
    assert ledger.standings([a, b]) == {a: 1.0, b: 0.1}
    assert ledger.score_history([b], 4) == {b: [0.1, 0.1, 0.1]}
    assert [e["kind"] for e in ledger.query("SELECT kind FROM events WHERE worker_id = ? AND kind = 'credit_revoked'",
                                            (b,))] == ["credit_revoked"]
    assert {r["name"]: r["tokens_credited"] for r in ledger.credit_table()} == {"a": 300, "b": 0}
    assert ledger.claimed_shards(4, []) == {} and ledger.claimed_shards(4, [a, b]) == {}


def test_excluded_members_lose_their_leases_and_failed_rounds_credit_nothing(ledger):
    a, b = join(ledger, "a"), join(ledger, "b")
    la, lb = ledger.lease(a, 0), ledger.lease(b, 0)
    ledger.clock_.t += 1
    beat(ledger, a, {la["lease_id"]: 50})
    beat(ledger, b, {lb["lease_id"]: 50})
    ledger.commit_round(0, included={a: 50}, excluded={b: "non-finite values"}, theta_hash="h1", averaging_seconds=1)
    assert ledger.included(0, a) and not ledger.included(0, b)
    assert ledger.lease_row(lb["lease_id"])["state"] == "released"
    assert ledger.shard(lb["shard_index"])["state"] == "pending"
    assert ledger.query("SELECT detail FROM events WHERE kind = 'contribution_rejected'")[0]["detail"] == \
        "round 0: non-finite values"
    assert ledger.round_rows(1)[1]["theta_hash"] == "h1" and ledger.get_meta("round") == 1
    ledger.clock_.t += 1
    beat(ledger, a, {la["lease_id"]: 10}, round_=1, current=1)
    ledger.fail_round(1, excluded={a: "averaging failed"}, detail="averaging failed")
    assert ledger.lease_row(la["lease_id"])["state"] == "released" and ledger.get_meta("tokens_trained") == 50
    assert ledger.round_rows(1, 2)[1]["state"] == "failed" and ledger.round_rows(2)[2]["theta_hash"] == "h1"


def test_peer_ids_are_one_worker_each(ledger):
    a, b = join(ledger, "a"), join(ledger, "b")
    assert ledger.peer_owner("peer-a") == a
    assert ledger.register_peer(b, "peer-a") == (False, "that hivemind peer id is registered by another worker")
    assert ledger.register_peer(b, "peer-b2") == (True, "") and ledger.peer_owner("peer-b2") == b
    ledger.leave(a)
    assert ledger.peer_owner("peer-a") is None


def test_every_shard_once_per_epoch(ledger):
    a, b = join(ledger, "a"), join(ledger, "b")
    leases = [ledger.lease(a, 0), ledger.lease(a, 0), ledger.lease(b, 0)]
    assert isinstance(ledger.lease(b, 0), str)  # all leased, none done: no new epoch yet
    ledger.clock_.t += 1
    beat(ledger, a, {l["lease_id"]: l["tokens"] for l in leases[:2]})
    ledger.commit_round(0, included={a: leases[0]["tokens"] + leases[1]["tokens"]}, excluded={}, theta_hash="h1",
                        averaging_seconds=1)
    assert isinstance(ledger.lease(a, 1), str)  # one still out
    ledger.release(b, [leases[2]["lease_id"]])
    l = ledger.lease(b, 1)
    assert l["shard_index"] == leases[2]["shard_index"] and l["epoch"] == 0
    ledger.clock_.t += 1
    beat(ledger, b, {l["lease_id"]: l["tokens"]}, round_=1, current=1)
    ledger.commit_round(1, included={b: l["tokens"]}, excluded={}, theta_hash="h2", averaging_seconds=1)
    nxt = ledger.lease(a, 2)
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


def test_sessions_are_stored_hashed(ledger):
    wid, session, _ = ledger.add_worker(name="x", device="cpu", peer_id="p", current_round=3, round_started=True)
    assert ledger.worker_for_session(session)["id"] == wid
    assert ledger.worker(wid)["eligible_round"] == 4  # joined mid-round: waits for the next
    raw = sqlite3.connect(ledger.path).execute("SELECT group_concat(session_hash) FROM workers").fetchone()[0]
    assert session not in raw


def test_sessions_expire_end_on_leave_and_rotation_and_the_secret_brings_the_worker_back(ledger):
    wid, session, secret = ledger.add_worker(name="x", device="cpu", peer_id="p", current_round=0,
                                             round_started=False)
    raw = sqlite3.connect(ledger.path).execute("SELECT secret_hash FROM workers").fetchone()[0]
    assert secret not in raw
    ledger.clock_.t += 50
    assert ledger.worker_for_session(session, ttl=60)["id"] == wid
    beat(ledger, wid)  # used: the clock of its expiry starts again
    ledger.clock_.t += 59
    assert ledger.worker_for_session(session, ttl=60) is not None
    ledger.clock_.t += 2
    assert ledger.worker_for_session(session, ttl=60) is None  # unused for over a minute: gone for good
    assert ledger.worker_for_session(session) is None
    assert ledger.resume_worker(wid, "not-its-secret", peer_id="p", current_round=0, round_started=False) is None
    assert ledger.resume_worker("w-nobody", secret, peer_id="p", current_round=0, round_started=False) is None
    again = ledger.resume_worker(wid, secret, peer_id="p2", current_round=0, round_started=True)
    w = ledger.worker_for_session(again)
    assert w["id"] == wid and w["peer_id"] == "p2" and w["eligible_round"] == 1  # same worker, next round
    ledger.leave(wid)
    assert ledger.worker_for_session(again) is None  # Leave ends the session
    back = ledger.resume_worker(wid, secret, peer_id="p2", current_round=0, round_started=False)
    other, other_session, _ = ledger.add_worker(name="y", device="cpu", peer_id="q", current_round=0,
                                                round_started=False)
    assert ledger.revoke_sessions("the swarm token was rotated") == 2
    assert ledger.worker_for_session(back) is None and ledger.worker_for_session(other_session) is None
    kinds = [k for (k,) in sqlite3.connect(ledger.path).execute("SELECT kind FROM events")]
    assert {"session_expired", "rejoin", "sessions_revoked"} <= set(kinds)


def test_refused_strangers_are_counted_per_network_not_a_row_each(ledger, monkeypatch):
    import gptswarm.coordinator.ledger.events as module

    monkeypatch.setattr(module, "MAX_SOURCES", 3)
    for i in range(50):
        ledger.refuse_source("auth_failed", "a join with a wrong or missing swarm token", f"ip:10.0.{i % 5}.0/24")
    rows = {r["worker_id"]: r["n"] for r in ledger.query("SELECT worker_id, n FROM refusals")}
    assert rows == {"ip:10.0.0.0/24": 10, "ip:10.0.1.0/24": 10, "ip:10.0.2.0/24": 10, "ip:many": 20}
    events = ledger.query("SELECT detail FROM events WHERE kind = 'refused'")
    assert len(events) == 1 and "wrong or missing swarm token" in events[0]["detail"]  # one a minute, for all
    ledger.clock_.t += 61
    ledger.refuse_source("auth_failed", "a join with a wrong or missing swarm token", "ip:10.0.0.0/24")
    assert len(ledger.query("SELECT 1 FROM events WHERE kind = 'refused'")) == 2
    assert ledger.refusal_counts() == {"auth_failed": 51}


def test_lease_order_is_a_seeded_shuffle_per_epoch(tmp_path):
    def run(path):
        led = Ledger(path, lease_seconds=60, heartbeat_interval=1.0, max_leases=100)
        led.add_shards([(f"s{i}", 10) for i in range(40)])
        led.start_round(0, "h")
        w = join(led)
        order = []
        for r in range(2):
            leases = [led.lease(w, r) for _ in range(40)]
            order += [l["shard_index"] for l in leases]
            beat(led, w, {l["lease_id"]: 10 for l in leases}, round_=r, current=r)
            led.commit_round(r, included={w: 400}, excluded={}, theta_hash="h", averaging_seconds=1)
        led.close()
        return order

    order = run(tmp_path / "l.sqlite")
    first, second = order[:40], order[40:]
    assert sorted(first) == sorted(second) == list(range(40))  # each epoch: every shard once
    assert first != list(range(40)) and first != second  # not the file's order, and new each epoch
    assert run(tmp_path / "m.sqlite") == order  # reproducible


def test_a_failed_transaction_changes_nothing(ledger):
    with pytest.raises(RuntimeError):
        with ledger.tx() as db:
            db.execute("UPDATE shards SET state = 'done'")
            raise RuntimeError("crash mid-transaction")
    assert ledger.shard_counts() == {"pending": 3, "leased": 0, "done": 0}


def test_group_members_are_whoever_can_bring_tokens(ledger):
    """The round's averaging group: anyone who held a lease since the round started (in progress, or
    closed since) or has verified tokens in it, never someone who left or only leased before."""
    a, b, c, d = (join(ledger, n) for n in "abcd")
    la = ledger.lease(a, 0)  # a: leased in the previous round, still training it
    lc = ledger.lease(c, 0)  # c: leased and released before the round started
    ledger.release(c, [lc["lease_id"]])
    ledger.clock_.t += 10
    start = ledger.clock_.t
    assert [m[0] for m in ledger.group_members(0, start)] == [a]
    ledger.clock_.t += 1
    beat(ledger, a, {la["lease_id"]: 60}, [la["lease_id"]])
    lb = ledger.lease(b, 1)  # b: leased in this round, then gave the shard back (paused)
    ledger.release(b, [lb["lease_id"]])
    members = {m[0]: (m[1], m[2]) for m in ledger.group_members(0, start)}
    assert members == {a: ("peer-a", 60), b: ("peer-b", 0)}  # weights: the verified tokens
    ledger.leave(b)
    assert [m[0] for m in ledger.group_members(0, start)] == [a]
    assert [m[0] for m in ledger.group_members(0, ledger.clock_.t + 1)] == [a]  # a still holds its lease


def test_flags_count_towards_quarantine_only_in_rounds_that_stood(tmp_path):
    led = Ledger(tmp_path / "q.sqlite", lease_seconds=60, heartbeat_interval=1.0, quarantine_after=2,
                 quarantine_window=5)
    led.start_round(0, "h")
    w = join(led, "w")
    for r in range(3):  # every member flagged and the round failed: the judge, not the members, is in doubt
        led.fail_round(r, excluded={w: "flagged: left out of 4 of 4 parts"}, detail="no contribution reached it")
    assert led.quarantine_reason(w) is None
    led.commit_round(3, included={}, excluded={w: "flagged"}, flagged={w}, theta_hash="h", averaging_seconds=1)
    assert led.quarantine_reason(w) is None  # once in its last 4 rounds
    led.commit_round(4, included={}, excluded={w: "flagged"}, flagged={w}, theta_hash="h", averaging_seconds=1)
    assert "flagged in 2 of its last 5 rounds" in led.quarantine_reason(w)
    assert isinstance(led.lease(w, 5), str) and not led.group_members(5, 0)
    assert led.lift_quarantine(w) and led.quarantine_reason(w) is None and not led.lift_quarantine(w)
    led.close()


def test_replays_verify_credit_or_take_it_back(ledger):
    """A passed replay verifies its round's credit; a failed one takes back every unverified credit and
    quarantines; an unanswered one takes back its round's; a lost one changes nothing; overdue
    requests are found; a restart loses the open ones."""
    a, b, c = join(ledger, "a"), join(ledger, "b"), join(ledger, "c")
    for r in range(3):
        ledger.commit_round(r, included={a: 100, b: 100, c: 100}, excluded={}, theta_hash=f"h{r + 1}",
                            averaging_seconds=1)
    ledger.request_replays(0, {a: "0" * 64, b: "1" * 64}, deadline=60)
    ledger.request_replays(1, {a: "2" * 64, b: "3" * 64, c: "4" * 64}, deadline=60)
    assert ledger.replay_requested(0, a) and not ledger.replay_requested(2, a)
    assert ledger.replay_uploaded(0, a) and not ledger.replay_uploaded(0, a)  # once
    ledger.end_replay(0, a, "passed", "bit-equal", distance=0.0, seconds=1.0)
    ledger.end_replay(0, a, "failed", "too late: it ended")  # an ended replay stays as it ended
    ledger.end_replay(0, b, "passed", "bit-equal", distance=0.0)
    ledger.end_replay(1, b, "failed", "what it sent is 0.5 from what its record makes", distance=0.5)
    ledger.end_replay(1, a, "unanswered", "no record")
    assert ledger.worker(a)["tokens_verified"] == 100 and ledger.worker(a)["tokens_credited"] == 200
    # b: its verified round 0 stays; rounds 1 and 2 (unverified) go; quarantined
    assert ledger.worker(b)["tokens_verified"] == 100 and ledger.worker(b)["tokens_credited"] == 100
    assert "replay of round 1 failed" in ledger.quarantine_reason(b)
    # a round that averaged while b's replay failed includes it: its values are in, its credit is not
    ledger.commit_round(3, included={a: 100, b: 100}, excluded={}, theta_hash="h4", averaging_seconds=1)
    assert ledger.worker(b)["tokens_credited"] == 100 and ledger.worker(a)["tokens_credited"] == 300
    assert ledger.replay_counts() == {"passed": 2, "failed": 1, "unanswered": 1, "requested": 1}
    assert not ledger.overdue_replays()
    ledger.clock_.t += 61
    assert [(r["round"], r["worker_id"]) for r in ledger.overdue_replays()] == [(1, c)]
    assert ledger.lose_open_replays("restarted") == 1 and ledger.worker(c)["tokens_credited"] == 300
    table = {r["name"]: r for r in ledger.credit_table()}
    assert (table["b"]["replays_passed"], table["b"]["replays_failed"], table["b"]["tokens_verified"]) == (1, 1, 100)
    kinds = [e["kind"] for e in ledger.query("SELECT kind FROM events WHERE kind LIKE 'replay%' ORDER BY id")]
    assert kinds == ["replay_passed", "replay_passed", "replay_failed", "replay_unanswered", "replays_lost"]

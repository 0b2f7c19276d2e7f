"""What the worker trains while its round averages belongs to the next round, or to nobody."""

import threading

from gptswarm.worker.state import LeasedShard, SharedState


def shard(lease_id, steps_needed=1):
    return LeasedShard(lease_id, tokens=100, batches=None, steps_needed=steps_needed)


def trained_ahead():
    s = SharedState()
    s.round, s.shard = 3, shard("l-a", steps_needed=2)
    s.stepped(s.shard, 60, 2.0, 0.1)  # round 3's
    s.ahead = True  # round 3 averages: what follows is round 4's
    s.stepped(s.shard, 64, 2.0, 0.1)  # its last 40 tokens, and the shard is finished
    s.next_shard = shard("l-b")
    return s


def test_steps_trained_ahead_are_claimed_in_the_next_round():
    s = trained_ahead()
    assert s.claims() == {"l-a": 60}  # round 3's claims only
    assert s.completed == [] and s.unannounced == []  # finished ahead: not said before round 4 opens
    assert sorted(s.lease_ids()) == ["l-a", "l-b"]  # but its lease, and the next one, stay extended
    s.next_round(4)
    assert (s.round, s.round_tokens) == (4, 40)
    assert s.claims() == {"l-a": 40}
    assert s.unannounced == ["l-a"] and [c[0] for c in s.completed] == ["l-a"]
    s.stepped(shard("l-b", steps_needed=2), 10, 2.0, 0.1)
    assert s.round_tokens == 50 and not s.ahead


def test_steps_trained_ahead_are_dropped_when_the_round_did_not_include_us():
    s = trained_ahead()
    s.next_round(4, keep_ahead=False)
    assert (s.round_tokens, s.claims(), s.completed, s.unannounced) == (0, {}, [], [])
    assert not s.ahead_leases and not s.ahead_completed


def test_a_lease_request_holds_one_rounds_finished_shards_and_claims():
    """A shard trained wholly during an averaging is announced finished in the next round, with its
    claims: the request is read in one critical section, whatever the round loop does meanwhile (read
    under two locks, a round that moved between them got an honest worker a finish_refused)."""
    s = SharedState()
    stop = threading.Event()

    def rounds():  # the round loop: each round, a shard trained ahead, then the next round opens
        r = 0
        while not stop.is_set():
            sh = shard(f"l-{r}")
            with s.lock:
                s.ahead, s.shard = True, sh
            s.stepped(sh, 100, 2.0, 0.1)  # trained wholly ahead, and finished
            r += 1
            s.next_round(r)

    loop = threading.Thread(target=rounds)
    loop.start()
    try:
        inconsistent = 0
        for _ in range(20_000):
            claims = s.lease_claims()
            inconsistent += not set(claims.finished_lease_ids) <= set(claims.tokens)
    finally:
        stop.set()
        loop.join()
    assert inconsistent == 0

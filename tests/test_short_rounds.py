"""Many short rounds with leases ahead: shards smaller than a round's share, so that a worker finishes
shards while its round averages and announces them in the next one. Honest workers are never refused
anything (a lease request whose finished shards and claims were read in two rounds got one a
finish_refused: the race this guards against; a round that ends, fails or is rolled back while a request
is on its way must not make a liar of its sender either), and every shard is credited once. The plain
mean aggregates: this is about leases and claims, not about the robust rule (tests/test_robust*.py)."""

from swarm import coordinator, join_address, ledger, wait_until, worker

SHORT = ["--tokens-per-round", "800", "--inner-steps", "1", "--shard-tokens", "512", "--aggregation", "mean"]
ROUNDS = 15


def test_many_short_rounds_refuse_no_honest_worker(tmp_path):
    sd = tmp_path / "state"
    coord = coordinator(sd, *SHORT)
    procs = [coord]
    try:
        join = join_address(coord)
        a, b = worker(join, "alice"), worker(join, "bob")
        procs += [a, b]
        wait_until(lambda: ledger(sd, "SELECT COUNT(*) FROM rounds WHERE state = 'done' AND contributors >= 2")[0][0]
                   >= ROUNDS, 300, f"{ROUNDS} rounds with both workers")
        for w in (a, b):
            w.stop()
        coord.stop()
    finally:
        for p in procs:
            p.kill()
    # no claim of theirs was ever refused or clamped, no contribution left out for its content
    assert ledger(sd, "SELECT worker_id, kind, n, last_detail FROM refusals") == []
    assert ledger(sd, "SELECT round, worker_id, reason FROM contributions WHERE reason LIKE '%claim%'") == []
    # shards finished while a round averaged, announced in the next (the path of the race)
    ahead = ledger(sd, "SELECT COUNT(*) FROM leases WHERE state = 'done' AND done_round > round")[0][0]
    assert ahead > 0
    done = ledger(sd, "SELECT shard_idx, epoch, COUNT(*) FROM leases WHERE state = 'done' GROUP BY 1, 2")
    assert done and all(n == 1 for _, _, n in done)
    assert ledger(sd, "SELECT COUNT(*) FROM leases WHERE state = 'done' AND credited != tokens")[0][0] == 0

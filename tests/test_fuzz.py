"""The gRPC API under a short fuzzing run (tests/fuzz_api.py; the long run is its own script):
every RPC with extreme values, no token, a wrong one and a real session, while a real worker
trains. No handler may crash (UNKNOWN / INTERNAL), the health service must answer after every
batch, the ledger must stay consistent, and rounds must go on."""

from fuzz_api import FUZZ_ARGS, Fuzzer
from swarm import channel, coordinator, join_address, ledger, wait_until, worker

CALLS, BATCH = 1500, 300


def test_fuzzed_api_keeps_the_coordinator_sound(tmp_path):
    sd = tmp_path / "coord"
    coord = coordinator(sd, *FUZZ_ARGS)
    procs = [coord]
    try:
        join = join_address(coord)
        procs.append(worker(join, "honest"))
        done = lambda: len(ledger(sd, "SELECT 1 FROM rounds WHERE state = 'done'"))  # noqa: E731
        wait_until(done, timeout=90, what="a first round")
        before = done()
        with channel(join) as ch:
            fuzzer = Fuzzer(ch, "sekrit", sd / "ledger.sqlite", seed=7)
            while fuzzer.calls < CALLS:
                assert fuzzer.batch(BATCH) == [], f"after {fuzzer.calls} calls"
        assert fuzzer.failures == [], fuzzer.failures[:5]
        assert coord.p.poll() is None
        assert {"OK", "UNAUTHENTICATED", "INVALID_ARGUMENT"} <= set(fuzzer.codes), fuzzer.codes
        wait_until(lambda: done() > before + 1, timeout=90, what="rounds going on after the fuzzing")
    finally:
        for p in procs:
            p.kill()

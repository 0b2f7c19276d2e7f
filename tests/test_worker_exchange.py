"""What the round loop does once a round's exchange is over (worker/exchange.py's ending()), and a
training step's bookkeeping in one critical section (SharedState.stepped)."""

import random

from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.rounds.averaging import Outcome
from gptswarm.states import RoundState
from gptswarm.worker.exchange import ending
from gptswarm.worker.state import LeasedShard, SharedState


def end(ok=True, state=RoundState.DONE, included=True, agrees=True, ahead_seconds=1.0, finishing=False):
    return ending(7, Outcome(ok), pb.RoundResult(state=state, included=included, detail="why"), agrees=agrees,
                  ahead_seconds=ahead_seconds, finishing=finishing)


def test_a_committed_round_keeps_what_was_trained_ahead():
    e = end()
    assert (e.committed, e.resync, e.keep, e.give_back) == (True, False, True, "")
    assert end(finishing=True).give_back.startswith("the steps trained ahead")  # finishing: dropped, not kept
    assert not end(finishing=True).keep and end(finishing=True).committed


def test_a_round_without_us_gives_every_lease_back():
    e = end(included=False)
    assert not e.keep and e.give_back == "round 7 did not include our contribution (why)"
    assert e.committed and not e.resync  # it committed without us: theta agrees, loaded as it is


def test_a_failed_round_loads_the_same_theta_and_a_disagreeing_one_resynchronizes():
    failed = end(state=RoundState.FAILED)
    assert (failed.committed, failed.resync, failed.keep) == (False, False, False)
    assert failed.give_back.startswith("the steps trained ahead")
    assert end(state=RoundState.FAILED, ahead_seconds=0.0).give_back == ""  # nothing trained ahead: nothing to drop
    assert end(agrees=False).resync and end(state=RoundState.REJECTED, agrees=False).resync
    assert end(ok=False).resync  # the round moved without our step: theta is not ours


def test_a_step_counts_no_more_than_its_shards_tokens():
    s = SharedState()
    s.shard = shard = LeasedShard("l-a", tokens=100, batches=None, steps_needed=2)
    s.stepped(shard, 64, 2.5, 0.1)
    assert (shard.steps_done, shard.counted, shard.loss, s.round_tokens, s.shard) == (1, 64, 2.5, 64, shard)
    s.stepped(shard, 64, 2.0, 0.1)  # the last batch reaches past the shard's tokens
    assert (shard.counted, s.round_tokens, s.claims(), s.shard) == (100, 100, {"l-a": 100}, None)
    assert s.completed == [("l-a", 100, 2.0)] and s.unannounced == ["l-a"]


def test_a_worker_sends_only_to_reducers_it_can_name():
    """The reducers a group names come from the coordinator over its pinned channel; a worker still
    refuses a group whose reducer nodes repeat, do not parse or are too many, and, with no nodes
    named, one whose reducer is not the coordinator's peer it learned at join."""
    from fuzz_api import random_peer_id
    from gptswarm.worker.exchange import MAX_REDUCERS, refuse_reducers

    rng = random.Random(3)
    coordinator, a, b = (random_peer_id(rng) for _ in range(3))
    node = lambda p: pb.ReducerNode(peer_id=p, maddrs=["/ip4/127.0.0.1/tcp/1"])  # noqa: E731
    assert refuse_reducers(pb.AveragingGroup(reducer_peer_id=coordinator), coordinator) == ""
    assert "another reducer" in refuse_reducers(pb.AveragingGroup(reducer_peer_id=a), coordinator)
    assert refuse_reducers(pb.AveragingGroup(reducer_peer_id=coordinator, reducers=[node(a), node(b)]), coordinator) == ""
    assert refuse_reducers(pb.AveragingGroup(reducers=[node(a), node(a)]), coordinator)
    assert refuse_reducers(pb.AveragingGroup(reducers=[node(a), node("not a peer id")]), coordinator)
    many = [node(random_peer_id(rng)) for _ in range(MAX_REDUCERS + 1)]
    assert refuse_reducers(pb.AveragingGroup(reducers=many), coordinator)

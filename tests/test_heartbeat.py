"""The worker's heartbeat pace: a heartbeat interval while the round is far from its tokens, and
fast beats when the swarm's pace says it is about to end (so that the worker's tokens end it, and
the worker learns of the averaging, without waiting out an interval)."""

import time

from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.worker.heartbeat import FAST_BEAT, Heartbeats
from gptswarm.worker.state import SharedState


def pace(view, state="training"):
    shared = SharedState()
    shared.set(state, "")
    shared.heard(view)
    return Heartbeats(shared, client=None, interval=1.0, bytes_sent=lambda: 0).next_wait()


def test_heartbeats_speed_up_as_the_round_nears_its_tokens():
    far = pb.HeartbeatResponse(phase="training", tokens_per_round=10_000, swarm_round_tokens=0,
                               swarm_tokens_per_second=1000)
    assert pace(far) == 1.0  # ten seconds left: the interval
    near = pb.HeartbeatResponse(phase="training", tokens_per_round=10_000, swarm_round_tokens=9_700,
                                swarm_tokens_per_second=1000)
    assert abs(pace(near) - (0.3 + FAST_BEAT)) < 0.05  # just after the swarm's pace says it ends
    due = pb.HeartbeatResponse(phase="training", tokens_per_round=10_000, swarm_round_tokens=12_000,
                               swarm_tokens_per_second=1000)
    assert pace(due) == FAST_BEAT  # overdue: as fast as it goes, no faster
    # not training, or the round already averaging, or no pace known: the interval
    assert pace(near, state="waiting") == 1.0
    assert pace(pb.HeartbeatResponse(phase="averaging", tokens_per_round=10_000, swarm_round_tokens=9_700,
                                     swarm_tokens_per_second=1000)) == 1.0
    assert pace(pb.HeartbeatResponse(phase="training", tokens_per_round=10_000)) == 1.0


def test_the_prediction_counts_the_time_since_the_coordinator_answered():
    shared = SharedState()
    shared.set("training", "")
    shared.heard(pb.HeartbeatResponse(phase="training", tokens_per_round=10_000, swarm_round_tokens=9_000,
                                      swarm_tokens_per_second=1000))
    shared.heard_at = time.monotonic() - 0.95  # the answer is 0.95 s old: the round is due now
    assert Heartbeats(shared, client=None, interval=1.0, bytes_sent=lambda: 0).next_wait() < 0.2

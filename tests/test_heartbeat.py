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


def test_a_large_swarm_beats_as_fast_as_the_coordinator_allows():
    due = dict(phase="training", tokens_per_round=10_000, swarm_round_tokens=12_000, swarm_tokens_per_second=1000)
    assert pace(pb.HeartbeatResponse(**due, fast_beat_seconds=0.64)) == 0.64  # 64 workers, 100 beats a second
    assert pace(pb.HeartbeatResponse(**due, fast_beat_seconds=0.02)) == FAST_BEAT  # never below the worker's own
    assert pace(pb.HeartbeatResponse(**due, fast_beat_seconds=5.0)) == 1.0  # never slower than the interval


def test_the_coordinator_paces_fast_beats_by_the_swarm_size(tmp_path):
    from gptswarm.coordinator.ledger import Ledger
    from gptswarm.coordinator.server import FAST_BEAT_MIN, FAST_BEATS_PER_SECOND, Coordinator

    class Swarm:  # the one method's state, on a real ledger
        fast_beat_seconds = Coordinator.fast_beat_seconds
        _online = (0, float("-inf"))
        ledger = Ledger(tmp_path / "ledger.sqlite", lease_seconds=60, heartbeat_interval=1.0)

    c = Swarm()
    assert c.fast_beat_seconds() == FAST_BEAT_MIN
    for i in range(2 * FAST_BEATS_PER_SECOND):
        c.ledger.add_worker(name=f"w{i}", device="cpu", peer_id=f"p{i}", current_round=0, round_started=False)
    assert c.fast_beat_seconds() == FAST_BEAT_MIN  # counted at most once a second
    c._online = (c._online[0], float("-inf"))
    assert c.fast_beat_seconds() == 2.0  # 200 workers online: each every 2 s, 100 beats a second in all

"""The worker's compute utilization counts only the training that rounds used."""

from gptswarm.worker.utilization import Utilization


class Clock:
    t = 100.0

    def __call__(self):
        return self.t


def test_steps_after_the_last_round_do_not_count():
    clock = Clock()
    u = Utilization(clock)
    assert u.share() is None
    for _ in range(4):  # 4 steps of 2 s, then 2 s of averaging: a 10 s round, 8 s of it computing
        clock.t += 2
        u.step(2.0)
    clock.t += 2
    u.synced()
    for _ in range(30):  # stopped mid-round: 60 s of training that no round averaged
        clock.t += 2
        u.step(2.0)
    compute, wall, share = u.share()
    assert (compute, wall) == (8.0, 10.0) and share == 0.8  # not 68 s of compute in a 10 s wall clock


def test_steps_trained_ahead_count_when_their_round_ends():
    clock = Clock()
    u = Utilization(clock)
    for _ in range(4):  # 4 steps of 2 s; then the round averages while 1 step of 2 s is trained ahead
        clock.t += 2
        u.step(2.0)
    clock.t += 2
    u.step(2.0)
    u.synced(ahead_seconds=2.0)  # its average arrived: that step is the next round's
    assert u.share() == (8.0, 10.0, 0.8)
    for _ in range(4):  # the next round: 4 more steps, and its average comes with no wait
        clock.t += 2
        u.step(2.0)
    u.synced()
    assert u.share() == (18.0, 18.0, 1.0)  # no idle second since the first step

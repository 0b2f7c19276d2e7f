"""Round averaging through real hivemind peers on loopback."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gptswarm.rounds.averaging import SwarmAverager, start_dht

TEMPLATE = {"a.weight": torch.zeros(300, 100), "b.bias": torch.zeros(77)}  # 30,077 floats


@pytest.fixture(scope="module", params=["fp16", "8bit"])
def swarm(request):
    coord_dht = start_dht("127.0.0.1:0")
    peers = [str(m) for m in coord_dht.get_visible_maddrs()]
    w1_dht = start_dht("127.0.0.1:0", peers)
    w2_dht = start_dht(initial_peers=peers, client_mode=True)
    avs = [SwarmAverager(d, TEMPLATE, prefix="test-" + request.param, compression=request.param, client_mode=cm,
                         matchmaking_time=2.0)
           for d, cm in ((coord_dht, False), (w1_dht, False), (w2_dht, True))]
    yield request.param, avs
    for a in avs:
        a.shutdown()
    for d in (coord_dht, w1_dht, w2_dht):
        d.shutdown()


def run_round(avs, tensors, weights, round_):
    with ThreadPoolExecutor(len(avs)) as ex:
        futs = [ex.submit(a.average, t, weight=w, round_=round_, worker_id=f"p{i}", timeout=30)
                for i, (a, t, w) in enumerate(zip(avs, tensors, weights))]
        return [f.result() for f in futs]


def filled(v):
    return {k: torch.full_like(t, v) + torch.randn_like(t) * 0.01 for k, t in TEMPLATE.items()}


def test_token_weighted_identical_average_and_bytes(swarm):
    codec, avs = swarm
    g1, g2 = filled(1.0), filled(4.0)
    # a real all-reduce can fail (a reducer times out); it must then say so, never hand back a
    # partial average as a result: the next round tries again, as the swarm does
    for round_ in (1, 101, 201):
        outs = run_round(avs, [filled(0.0), g1, g2], [0, 3, 1], round_=round_)
        if all(o.ok for o in outs):
            break
    assert all(o.ok for o in outs), [o.error for o in outs]
    assert {m["worker_id"] for m in outs[0].members} == {"p0", "p1", "p2"}
    expected = {k: (3 * g1[k] + g2[k]) / 4 for k in TEMPLATE}
    tol = 0.01 if codec == "fp16" else 0.05
    for k in TEMPLATE:
        assert (outs[0].averaged[k] - expected[k]).abs().max() < tol
        # every peer holds the very same bits: they can all take the same outer step
        assert torch.equal(outs[0].averaged[k], outs[1].averaged[k])
        assert torch.equal(outs[0].averaged[k], outs[2].averaged[k])
    n = sum(t.numel() for t in TEMPLATE.values())
    per_float = 2 if codec == "fp16" else 1
    # the client-mode worker sends its whole vector once (it reduces nothing)
    assert n * per_float <= outs[2].bytes_sent <= n * per_float * 1.1 + 4096
    assert outs[0].bytes_sent > 0 and outs[1].bytes_sent > 0


def test_non_finite_contribution_is_excluded(swarm):
    codec, avs = swarm
    good, bad = filled(2.0), filled(1.0)
    for t in bad.values():
        t[0] = float("nan")
    outs = run_round(avs, [filled(0.0), good, bad], [0, 5, 5], round_=2)
    assert outs[0].ok and outs[1].ok
    assert outs[0].rejected == {"p2": "non-finite values in its pseudo-gradient"}
    for k in TEMPLATE:  # the average is the good worker's alone: the bad one did not move it
        assert torch.isfinite(outs[0].averaged[k]).all()
        assert (outs[0].averaged[k] - good[k]).abs().max() < 0.05
        assert torch.equal(outs[0].averaged[k], outs[1].averaged[k])


def test_rounds_do_not_mix(swarm):
    _, avs = swarm
    outs = run_round(avs[:2], [filled(0.0), filled(1.0)], [0, 1], round_=3)
    late = avs[2].average(filled(9.0), weight=1, round_=3, worker_id="p2", timeout=4)  # its round's group is gone
    assert outs[0].ok and {m["worker_id"] for m in outs[0].members} == {"p0", "p1"}
    assert not late.ok and late.error

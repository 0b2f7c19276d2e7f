"""Round averaging through real hivemind peers on loopback: the coordinator's RoundReducer and
workers' RoundContributors, with the group and the weights decided by the coordinator."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gptswarm.rounds.averaging import Group, RoundContributor, RoundReducer
from gptswarm.rounds.codecs import ErrorFeedback
from gptswarm.rounds.p2p import P2PNode
from gptswarm.rounds.reports import merge, report

TEMPLATE = {"a.weight": torch.zeros(300, 100), "b.bias": torch.zeros(77)}  # 30,077 floats


CODECS = [("fp16", "mean"), ("8bit", "robust"), ("4bit", "robust"), ("topk", "mean")]
BYTES_PER_VALUE = {"fp16": 2, "8bit": 1, "4bit": 0.5 + 2 / 64, "topk": 0.03 * 3}  # topk: 3% kept, 3 bytes each
TOLERANCE = {"fp16": 0.001, "8bit": 0.02, "4bit": 0.12, "topk": 0.02}  # the codec's rounding, relative


@pytest.fixture(scope="module", params=CODECS, ids=[f"{c}-{a}" for c, a in CODECS])
def swarm(request):
    codec, aggregation = request.param
    refused = []
    coord = P2PNode(listen="127.0.0.1:0")
    workers = [P2PNode(), P2PNode()]  # outgoing only, as real workers
    reducer = RoundReducer(coord, TEMPLATE, prefix="test", compression=codec, aggregation=aggregation,
                           sender_timeout=3.0, on_refused=lambda peer, reason: refused.append((peer, reason)))
    contributors = [RoundContributor(n, TEMPLATE, prefix="test", compression=codec) for n in workers]
    yield codec, reducer, contributors, refused
    for n in (coord, *workers):
        n.shutdown()


def run_round(reducer, contributors, tensors, weights, claimed=None, round_=0):
    """The coordinator reduces a group of these contributors, weighed by `weights`; each one
    claims `claimed` as its weight in its messages (ignored)."""
    node = reducer.node
    group = Group(round_, {str(c.node.peer_id): (f"w{i}", w) for i, (c, w) in enumerate(zip(contributors, weights))})
    claimed = claimed or weights
    with ThreadPoolExecutor(len(contributors) + 1) as ex:
        red = ex.submit(reducer.reduce, group, 30)
        outs = [ex.submit(c.contribute, t, group_id=group.group_id, reducers=[(str(node.peer_id), node.maddrs())],
                          reducer_nodes=False, weight=w, timeout=30)
                for c, t, w in zip(contributors, tensors, claimed)]
        return red.result(), [f.result() for f in outs]


def filled(v, codec=None):
    """A pseudo-gradient around v: two of them agree (cosine about 0.8), as honest ones do, without
    being copies of each other. codec "topk": sparsified as a worker does (3% per chunk)."""
    g = {k: torch.full_like(t, v) + torch.randn_like(t) * 0.5 * v for k, t in TEMPLATE.items()}
    return ErrorFeedback(0.03).sparsify(g) if codec == "topk" else g


def test_weighted_identical_average_with_the_coordinators_weights(swarm):
    codec, reducer, contributors, _ = swarm
    g1, g2 = filled(1.0, codec), filled(1.5, codec)  # norms per square root of weight within 3x: no clipping
    # the second worker claims an absurd weight in its messages: the coordinator's weights count
    red, outs = run_round(reducer, contributors, [g1, g2], [3, 1], claimed=[3, 1e9])
    assert red.ok and all(o.ok for o in outs), (red.error, [o.error for o in outs])
    assert red.included == {"w0": 3, "w1": 1} and not red.rejected
    expected = {k: (3 * g1[k] + g2[k]) / 4 for k in TEMPLATE}
    for k in TEMPLATE:
        assert (red.averaged[k] - expected[k]).norm() < TOLERANCE[codec] * expected[k].norm()
        # every peer holds the very same bits: they can all take the same outer step
        assert torch.equal(red.averaged[k], outs[0].averaged[k])
        assert torch.equal(red.averaged[k], outs[1].averaged[k])
    n = sum(t.numel() for t in TEMPLATE.values())
    per_value = BYTES_PER_VALUE[codec]
    for o in outs:  # a worker sends its whole vector once
        assert n * per_value <= o.bytes_sent <= n * per_value * 1.1 + 4096
    # the coordinator sends the average to each (top-k: the union of the two supports, nearly twice each)
    assert red.bytes_sent >= 2 * n * per_value * (1.8 if codec == "topk" else 1)


def test_non_finite_contribution_is_excluded(swarm):
    codec, reducer, contributors, _ = swarm
    good, bad = filled(2.0, codec), filled(1.0, codec)
    for t in bad.values():
        t[0] = float("nan")
    red, outs = run_round(reducer, contributors, [good, bad], [5, 5], round_=1)
    assert red.ok and outs[0].ok
    assert red.rejected == {"w1": "non-finite values in its pseudo-gradient"} and red.included == {"w0": 5}
    for k in TEMPLATE:  # the average is the good worker's alone: the bad one did not move it
        assert torch.isfinite(red.averaged[k]).all()
        assert (red.averaged[k] - good[k]).norm() < max(0.02, TOLERANCE[codec]) * good[k].norm()
        assert torch.equal(red.averaged[k], outs[0].averaged[k])


def test_only_members_reach_the_average(swarm):
    """A peer outside the group, even one that knows the group id, is turned away; a member that
    never sends is excluded after the sender timeout; the others' round completes."""
    codec, reducer, contributors, refused = swarm
    stranger = RoundContributor(P2PNode(), TEMPLATE, prefix="test", compression=codec)
    try:
        node = reducer.node
        group = Group(2, {str(contributors[0].node.peer_id): ("w0", 2), str(contributors[1].node.peer_id): ("w1", 2)})
        sent = filled(1.0, codec)
        with ThreadPoolExecutor(3) as ex:
            red = ex.submit(reducer.reduce, group, 30)
            member = ex.submit(contributors[0].contribute, sent, group_id=group.group_id,
                               reducers=[(str(node.peer_id), node.maddrs())], reducer_nodes=False, weight=2, timeout=30)
            intruder = ex.submit(stranger.contribute, filled(1000.0, codec), group_id=group.group_id,
                                 reducers=[(str(node.peer_id), node.maddrs())], reducer_nodes=False, weight=2, timeout=30)
            red, member, intruder = red.result(), member.result(), intruder.result()
    finally:
        stranger.node.shutdown()
    assert not intruder.ok
    assert red.ok and member.ok and red.included == {"w0": 2}
    assert red.rejected == {"w1": "did not send its whole contribution in time"}  # w1 never showed up
    assert any(peer == str(stranger.node.peer_id) and "not a member" in reason for peer, reason in refused)
    for k in TEMPLATE:
        # the intruder's 1000s are nowhere
        assert (red.averaged[k] - sent[k]).norm() < max(0.02, TOLERANCE[codec]) * sent[k].norm()



def test_agreement_is_not_an_attack(swarm):
    """Through real peers: two honest members that point almost the same way (a step or two per round:
    AdamW's moments dominate) are not copies, and two that point against each other are averaged, with
    the round's stats saying so; the round commits with both either way."""
    codec, reducer, contributors, _ = swarm
    if reducer.history is None:
        pytest.skip("the plain mean has no rule to test")
    base = filled(1.0)
    near = {k: v + 0.1 * v.norm() / v.numel() ** 0.5 * torch.randn_like(v) for k, v in base.items()}  # cosine 0.995
    red, outs = run_round(reducer, contributors, [base, near], [2, 2], round_=10)
    assert red.ok and all(o.ok for o in outs) and red.included == {"w0": 2, "w1": 2}, red.rejected
    assert not red.stats.rescued and red.stats.left_out_fraction() == 0
    opposed = {k: -0.5 * v for k, v in filled(1.0).items()}
    red, outs = run_round(reducer, contributors, [filled(1.0), opposed], [2, 2], round_=11)
    assert red.ok and red.included == {"w0": 2, "w1": 2}, red.rejected
    assert red.stats.rescued and red.stats.parts_lost == 0 and "in conflict" in red.stats.rescue_summary()


@pytest.mark.parametrize("codec,aggregation", [("8bit", "robust"), ("fp16", "mean")])
def test_reducer_nodes_split_the_reduce_and_every_peer_gets_the_same_bits(codec, aggregation):
    """Two reducer nodes, each an equal fraction of every tensor: the members send each its parts,
    the coordinator sends zeros of weight 0 and receives the average like a member; everybody ends
    with the same bits, the weighted average of the members' (weights as the coordinator says when
    a member's stream opens, whatever its messages claim); a hostile member is left out on both
    reducers' parts, and their part scores add up to its whole contribution."""
    coord, r1, r2 = P2PNode(listen="127.0.0.1:0"), P2PNode(listen="127.0.0.1:0"), P2PNode(listen="127.0.0.1:0")
    workers = [P2PNode(), P2PNode(), P2PNode()]
    try:
        reducers = [RoundReducer(n, TEMPLATE, prefix="nodes", compression=codec, aggregation=aggregation,
                                 sender_timeout=5.0, on_refused=lambda p, r: None, group_wait=10.0) for n in (r1, r2)]
        contributors = [RoundContributor(n, TEMPLATE, prefix="nodes", compression=codec) for n in (coord, *workers)]
        peers = [str(n.peer_id) for n in workers]
        final = {peers[0]: 3, peers[1]: 1, peers[2]: 2}  # what the coordinator says once they asked
        reducer_ids = [str(r1.peer_id), str(r2.peer_id)]
        g1, g2 = filled(1.0), filled(1.5)
        bad = {k: -100 * v for k, v in filled(1.0).items()} if aggregation == "robust" else filled(0.5)
        with ThreadPoolExecutor(6) as ex:
            groups = [Group(4, {p: (f"w{i}", 1) for i, p in enumerate(peers)}) for _ in reducers]
            groups[1] = Group(4, groups[0].snapshot(), group_id=groups[0].group_id)
            reds = [ex.submit(r.reduce, g, 60, reducers=reducer_ids, coordinator=str(coord.peer_id),
                              final_weights=lambda: dict(final)) for r, g in zip(reducers, groups)]
            where = [(p, n.maddrs()) for p, n in zip(reducer_ids, (r1, r2))]
            outs = [ex.submit(c.contribute, t, group_id=groups[0].group_id, reducers=where, reducer_nodes=True,
                              weight=w, timeout=60)
                    for c, t, w in zip(contributors, [zero_like(), g1, g2, bad], [0, 1e9, 1, 2])]
            reds, outs = [f.result() for f in reds], [f.result() for f in outs]
        assert all(r.ok for r in reds) and all(o.ok for o in outs[:3]), ([r.error for r in reds], [o.error for o in outs])
        for k in TEMPLATE:
            for o in outs[1:3]:
                assert torch.equal(outs[0].averaged[k], o.averaged[k])  # the coordinator's bits are the members'
        if aggregation == "robust":
            expected = {k: (3 * g1[k] + g2[k]) / 4 for k in TEMPLATE}
            assert all("w2" in r.flagged for r in reds)
            elements = sum(r.scores["w2"].elements for r in reds)
            assert elements == sum(t.numel() for t in TEMPLATE.values())  # the two reducers' parts: the whole
            assert all(r.scores["w2"].excluded == r.scores["w2"].elements for r in reds)
        else:
            expected = {k: (3 * g1[k] + g2[k] + 2 * bad[k]) / 6 for k in TEMPLATE}
            assert all(r.included == {"w0": 3, "w1": 1, "w2": 2} for r in reds)
        for k in TEMPLATE:
            assert (outs[0].averaged[k] - expected[k]).norm() < TOLERANCE[codec] * expected[k].norm()
        assert all(r.bytes_sent > 0 for r in reds)  # both reduced their share
        # the coordinator sums the nodes' reports: the members' whole contributions decide
        merged = merge(groups[0].snapshot(), {f"r{i}": report(r) for i, r in enumerate(reds)}, outs[0].averaged)
        assert merged.ok and merged.bytes_sent == sum(r.bytes_sent for r in reds)
        if aggregation == "robust":
            assert merged.included == {"w0": 3, "w1": 1} and merged.flagged == {"w2"}
            assert merged.scores["w2"].elements == sum(t.numel() for t in TEMPLATE.values())
        else:
            assert merged.included == {"w0": 3, "w1": 1, "w2": 2} and not merged.flagged
    finally:
        for n in (coord, r1, r2, *workers):
            n.shutdown()


def zero_like():
    return {k: torch.zeros_like(t) for k, t in TEMPLATE.items()}

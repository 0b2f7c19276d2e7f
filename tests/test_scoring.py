"""coordinator/scoring.py on its own: the probe's reference gradients and dot products, and the
judgement of a round's members (their ratios, standings, flags), with a real ledger keeping the
history."""

import torch

from gptswarm.coordinator.ledger import Ledger
from gptswarm.coordinator.scoring import EVIDENCE, FLAG_BELOW, Scorer, factor_of
from gptswarm.mingpt_core.data import text_shards
from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.rounds.theta import theta_views

TEXT = "the quick brown fox jumps over the lazy dog. " * 400


def setup(tmp_path):
    chars = sorted(set(TEXT))
    shard_set = text_shards([chars.index(c) for c in TEXT], len(chars), 32, shard_tokens=2048)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt-nano", len(chars), 32))
    ledger = Ledger(tmp_path / "ledger.sqlite", lease_seconds=60, heartbeat_interval=1.0)
    ledger.add_shards([(s.sha256, len(s)) for s in shard_set.split("train")])
    ledger.start_round(0, "h0")
    names = list(theta_views(model))
    scorer = Scorer(shard_set=shard_set, train_shards=shard_set.split("train"), seq=32, names=names, ledger=ledger)
    return scorer, model, ledger, names


def descent(model, names, scale):
    """A pseudo-gradient along the loss's gradient on fresh text (what honest training moves towards), scaled."""
    chars = sorted(set(TEXT))
    ids = torch.tensor([chars.index(c) for c in TEXT[:33 * 64]]).view(64, 33)
    model.zero_grad()
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    params = dict(model.named_parameters())
    flat = torch.cat([(params[n].grad if n in params and params[n].grad is not None else
                       torch.zeros_like(theta_views(model)[n])).reshape(-1) for n in names])
    model.zero_grad()
    return flat * scale


def score_round(scorer, model, names, round_, contributions, tokens=1000):
    """Probe, feed every member's parts as the reducer would (parts of 4096 values), judge."""
    members = {w: tokens for w in contributions}
    probe = scorer.probe(model, round_, members)
    assert probe is not None
    total = next(iter(contributions.values())).numel()
    sizes = [min(4096, total - i) for i in range(0, total, 4096)]
    keys = [None, *contributions]
    probe.bind(keys, sizes)
    for sender, w in enumerate(keys[1:], start=1):
        for j, part in enumerate(contributions[w].split(sizes)):
            probe.take(sender, j, part)
    return scorer.judge(round_, probe, members)


def record(ledger, round_, scores):
    ledger.commit_round(round_, included={w: 1000 for w, s in scores.items() if not s.flagged},
                        excluded={w: "flagged" for w, s in scores.items() if s.flagged},
                        flagged={w for w, s in scores.items() if s.flagged}, theta_hash=f"h{round_ + 1}",
                        averaging_seconds=1,
                        scores={w: (s.ratio, s.leased, s.off, s.standing, s.factor, s.flagged) for w, s in scores.items()})


def test_a_tenth_of_the_work_is_a_tenth_of_the_score_and_is_flagged_once_there_is_evidence(tmp_path):
    scorer, model, ledger, names = setup(tmp_path)
    honest = descent(model, names, 1.0)
    for r in range(EVIDENCE):
        scores = score_round(scorer, model, names, r, {"a": honest, "b": honest * 1.1, "lazy": honest * 0.1})
        assert abs(scores["lazy"].ratio - 0.1 / 1.0) < 0.02  # the median member is a
        assert scores["a"].ratio == 1.0 and not scores["a"].flagged and not scores["b"].flagged
        assert scores["lazy"].flagged == (r == EVIDENCE - 1)  # judged from its EVIDENCE-th scored round
        assert scores["lazy"].factor == (0.0 if r == EVIDENCE - 1 else factor_of(scores["lazy"].standing))
        assert scores["lazy"].standing < FLAG_BELOW
        record(ledger, r, scores)
    standings = ledger.standings(["a", "lazy"])  # what the next round's group is weighed by
    assert standings["a"] > 0.9 and standings["lazy"] < FLAG_BELOW


def test_a_round_without_a_reference_scores_nobody_and_flags_nobody(tmp_path):
    scorer, model, ledger, names = setup(tmp_path)
    honest = descent(model, names, 1.0)
    assert scorer.probe(model, 0, {"a": 1000}) is None  # one member: no median to compare with
    scores = scorer.judge(0, None, {"a": 1000})
    assert scores["a"].ratio is None and scores["a"].factor == 1.0 and not scores["a"].flagged
    # every member moving the loss the wrong way: the median is no decrease, nobody is scored
    scores = score_round(scorer, model, names, 0, {"a": -honest, "b": -honest})
    assert all(s.ratio is None and not s.flagged for s in scores.values())
    # a worker with a bad history is not flagged in a round that did not score it
    for r in range(EVIDENCE):
        record(ledger, r, score_round(scorer, model, names, r, {"a": honest, "b": honest, "z": honest * 0.0}))
    scores = scorer.judge(EVIDENCE, None, {"a": 1000, "z": 1000})
    assert scores["z"].standing == 0.0 and not scores["z"].flagged and scores["z"].factor == 0.0


def test_the_probe_refuses_parts_that_do_not_tile_the_reference(tmp_path):
    scorer, model, ledger, names = setup(tmp_path)
    probe = scorer.probe(model, 0, {"a": 1000, "b": 1000})
    probe.bind([None, "a", "b"], [10, 20])
    assert probe.broken
    probe.take(1, 0, torch.ones(10))
    assert probe.dots["a"] == [0.0, 0.0]
    assert all(s.ratio is None for s in scorer.judge(0, probe, {"a": 1000, "b": 1000}).values())

"""A reducer node's report of its parts of a round (JSON, to the coordinator over gRPC), and the
coordinator's sum of its nodes' reports: each member's part scores add up over the nodes' parts,
so the coordinator flags and quarantines on the whole contribution, as when it reduces alone."""

import json
from dataclasses import fields

from gptswarm.rounds.averaging import Outcome, judge
from gptswarm.rounds.robust import PartScores, RoundStats

MAX_REPORT = 1 << 20  # bytes of one report (a member's scores are about 200 bytes: some 4,000 members)
STATS = [f.name for f in fields(RoundStats) if f.name not in ("rescued", "observe")]
# what the coordinator judges a member by (its agreement with each peer stays on the node: the rule's own)
SCORES = [f.name for f in fields(PartScores) if f.name not in ("dots", "noise2", "telling")]


def report(outcome: Outcome) -> str:
    """What a reducer node tells the coordinator of its parts of a round."""
    stats = outcome.stats
    return json.dumps({
        "invalid": outcome.invalid, "broken": sorted(outcome.broken), "lies": outcome.lies,
        "scores": {w: {k: getattr(s, k) for k in SCORES} for w, s in outcome.scores.items()},
        "stats": None if stats is None else {**{k: getattr(stats, k) for k in STATS},
                                             "rescued": {str(p): r for p, r in stats.rescued.items()}},
        "bytes_sent": outcome.bytes_sent})


def merge(members: dict[str, tuple[str, int]], reports: dict[str, str], averaged: dict, error: str = "") -> Outcome:
    """The round's Outcome from its reducer nodes' reports ({node name: report()}), for the group's
    members ({peer id: (worker id, final weight)}); averaged: the average the coordinator received.
    A report that is not one raises ValueError (the node failed the round)."""
    workers = {w for w, _ in members.values()}
    invalid: dict[str, str] = {}
    lies: dict[str, str] = {}
    broken: set[str] = set()
    scores: dict[str, PartScores] = {}
    stats, any_stats, sent = RoundStats(), False, 0
    for name, text in sorted(reports.items()):
        if len(text) > MAX_REPORT:
            raise ValueError(f"reducer {name}'s report is {len(text)} bytes")
        r = json.loads(text)
        for w, reason in dict(r["invalid"]).items():
            if w in workers:
                invalid.setdefault(w, str(reason)[:300])
        broken |= {w for w in r["broken"] if w in workers}
        lies.update({w: str(v)[:300] for w, v in dict(r["lies"]).items() if w in workers})
        for w, s in dict(r["scores"]).items():
            if w in workers:
                add_scores(scores.setdefault(w, PartScores()), PartScores(**{k: s[k] for k in SCORES}))
        if r["stats"] is not None:
            any_stats = True
            for k in STATS:
                setattr(stats, k, getattr(stats, k) + int(r["stats"][k]))
            stats.rescued.update({f"{name}:{p}": why for p, why in dict(r["stats"]["rescued"]).items()})
        sent += int(r["bytes_sent"])
    rejected, flagged, included = judge(members, invalid, broken, scores)
    ok = not error and any(included.values())
    return Outcome(ok, averaged if ok else {}, included if ok else {}, rejected, lies, scores, flagged,
                   stats if any_stats else None, sent, error or ("" if ok else "no contribution with tokens reached "
                                                                          "the average"), invalid, broken)


def add_scores(total: PartScores, s: PartScores) -> None:
    """total += s: counts and sums add up; per-reason and per-peer sums add up key by key."""
    for f in fields(PartScores):
        mine, theirs = getattr(total, f.name), getattr(s, f.name)
        if isinstance(mine, dict):
            for k, v in dict(theirs).items():
                mine[k] = mine.get(k, 0) + v
        else:
            setattr(total, f.name, mine + theirs)

"""The coordinator's robust aggregation, one part of the pseudo-gradient at a time.

A round's contributions arrive part by part (hivemind's all-reduce splits each tensor into parts
of at most half a megabyte); for each part the coordinator holds every member's copy
(memory: members x part, never members x model) and decides, before averaging it:

1. who is an outlier in this part:
   - too large: its norm per square root of its weight (a pseudo-gradient grows with the tokens
     trained for it) is more than NORM_RATIO times the median of the members' (with three members
     or more), or than the other's (with two), or HISTORY_RATIO times the previous round's median
     (alone); honest, measured: one member's norm 6x the others' in an early round, a whole
     pseudo-gradient 4.5x the previous round's during the learning-rate warmup;
   - pointing elsewhere (three members or more): its agreement with the others is negative, or
     below both COS_FLOOR and COS_FRACTION of the typical member's. Its agreement is its k-th best
     cosine with another member, k = ceil((m - 1) / 2) of the m members not too large: with an
     honest majority, every honest member has that many honest peers (honest members, measured:
     cosines of 0.2-0.5 with each other mid-run, 0.9 in the first round);
   - in conflict (exactly two members): their cosine is below -COS_FLOOR, so one of them points
     against the other, and nobody can tell which: both are left out of the part, and neither is
     blamed for it (honest pairs, measured: above 0.1 in most parts, near 0 in some late in a run,
     where the gradient is mostly noise; a part of 1024 values or more puts two unrelated vectors
     within 0.03 of 0);
   - a copy: its cosine with another member's part, or its sampled coordinates' (a sketch) with
     the previous round's average or with its own previous contribution, is above COPY_COS
     (replays and duplicates);
   In a part of fewer than MIN_PART values (a bias, a LayerNorm's weights), cosines say little:
   only the norm rule applies there.
2. the part's aggregate: the weighted mean (weights: the ledger's tokens) of the members that are
   not outliers in it, each first clipped to CLIP_RATIO times the reference (per square root of
   its weight: an honest member that moved unusually far weighs as one that moved CLIP_RATIO
   times as far).

Breakdown point: the norm reference is a median and an honest member's agreement only needs
ceil((m - 1) / 2) honest peers, so fewer than half of the members (by count) being hostile cannot
move either; a hostile member is left out wherever it is far from the honest ones in norm or
direction, and inside those bounds it is clipped and weighs like any other member. With two
members, a conflict leaves the part out altogether (no progress, no damage) and a norm beyond
NORM_RATIO times the other's is caught; with one, only a norm beyond HISTORY_RATIO times the
previous round's median. The round's safety gate (the coordinator refuses a
theta that is not finite or whose validation loss jumps) is the last line behind both.

Every member's scores are summed over the parts (PartScores) so that the round can flag the ones
left out of most of their values. Everything here is deterministic: the coordinator computes each
part once and sends every member the same bytes.
"""

from dataclasses import dataclass, field

import torch

NORM_RATIO = 10.0  # a part more than this many times the reference norm is an outlier
HISTORY_RATIO = 30.0  # ... for a lone member, the previous round's median (early rounds grow fast: measured 4.5x
#                       for a whole pseudo-gradient between the first two rounds of a short warmup)
CLIP_RATIO = 3.0  # a kept part is clipped to this many times the reference norm
COS_FRACTION = 0.5  # a part less aligned with the median than this fraction of the typical member...
COS_FLOOR = 0.1  # ... and than this is an outlier
COPY_COS = 0.99  # sketches this similar are a copy (honest, measured: at most 0.4 to the previous round's
                 # average or the member's own last contribution, at most 0.89 between members, in round 0)
SKETCH = 256  # coordinates sampled per part for the sketches (a cosine estimate within about 0.06)
FLAG_FRACTION = 0.5  # a member left out of at least this fraction of its values is flagged for the round
MIN_PART = 1024  # in a smaller part (a bias, a LayerNorm), cosines say little: only the norm rule applies


@dataclass
class PartScores:
    """One member's scores over the parts of a round, counted in elements (parts differ in size:
    hivemind splits the vector tensor by tensor)."""
    parts: int = 0
    elements: int = 0
    left_out: int = 0  # elements of the parts it was left out of, for any reason
    excluded: int = 0  # ... for a reason of its own (not a conflict of two)
    reasons: dict = field(default_factory=dict)  # reason -> parts
    dot: float = 0.0  # with the aggregate, summed over parts
    norm2: float = 0.0
    agg_norm2: float = 0.0

    def cosine(self):
        return self.dot / max((self.norm2 * self.agg_norm2) ** 0.5, 1e-30)

    def mostly_left_out(self):
        """Most of it is not in the average: it earns no credit for the round."""
        return self.elements > 0 and self.left_out >= FLAG_FRACTION * self.elements

    def flagged(self):
        """Most of it was left out for what it is: the round counts towards its quarantine."""
        return self.elements > 0 and self.excluded >= FLAG_FRACTION * self.elements

    def summary(self):
        why = ", ".join(f"{r} in {n}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        return (f"left out of {self.left_out / self.elements:.0%} of its values, in {sum(self.reasons.values())} "
                f"of {self.parts} parts ({why}); cosine to the average {self.cosine():.2f}"
                if self.left_out else f"cosine to the average {self.cosine():.2f}")


class History:
    """What the coordinator remembers between rounds, per part index: the median member norm, the
    average's sketch, each worker's last sketch."""

    def __init__(self):
        self.norms, self.average, self.own = {}, {}, {}

    def forget(self, keep):
        """Drop the sketches of workers not in `keep` (they left)."""
        self.own = {key: v for key, v in self.own.items() if key[0] in keep}

    def sketch_index(self, part_index, size):
        g = torch.Generator().manual_seed(1_000_003 * part_index + size)
        return torch.randint(size, (min(SKETCH, size),), generator=g)


def _cos(a, b):
    return float(a @ b) / max(float(a.norm() * b.norm()), 1e-30)


def aggregate_part(part_index, parts, weights, keys, history, scores):
    """The robust aggregate of one part. parts: [tensor] (the members' copies, same shape);
    weights: [float > 0]; keys: [member key (worker id)]; history: History (read, and updated with
    this round's sketches and norms); scores: {key: PartScores} (updated)."""
    flat = torch.stack([p.reshape(-1).float() for p in parts])  # (n, d)
    n = len(keys)
    gram = flat @ flat.T  # (n, n): every norm and every pair's cosine at once
    norms = gram.diagonal().clamp_min(0).sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    # a pseudo-gradient grows with the tokens trained for it (linearly at first, as a random walk
    # later): norms are compared per square root of the member's weight
    scaled = norms / torch.tensor(weights, dtype=torch.float32).clamp_min(1e-30).sqrt()
    if n >= 3:
        ref, ratio = float(scaled.median()), NORM_RATIO
    elif n == 2:
        ref, ratio = float(scaled.min()), NORM_RATIO
    else:
        ref, ratio = history.norms.get(part_index), HISTORY_RATIO
    out = {}  # key -> reason it is left out of this part
    if ref:
        for i, k in enumerate(keys):
            if scaled[i] > ratio * ref:
                out[k] = "too large"
    idx = history.sketch_index(part_index, flat.shape[1])
    sketches = flat[:, idx]
    telling = flat.shape[1] >= MIN_PART
    if telling:
        for i in range(n):
            for j in range(i + 1, n):
                if cos[i, j] > COPY_COS:
                    out.setdefault(keys[i], "a copy")
                    out.setdefault(keys[j], "a copy")
        previous = history.average.get(part_index)
        for i, k in enumerate(keys):
            if any(r is not None and _cos(sketches[i], r) > COPY_COS for r in (previous, history.own.get((k, part_index)))):
                out.setdefault(k, "a copy")
    sane = [i for i, k in enumerate(keys) if k not in out] if telling else []
    if len(sane) >= 3:
        # each member's k-th best agreement with the others, k = what an honest majority guarantees
        k = len(sane) // 2
        agreement = {i: float(cos[i, [j for j in sane if j != i]].sort(descending=True).values[k - 1]) for i in sane}
        typical = sorted(agreement.values())[(len(sane) - 1) // 2]
        for i, a in agreement.items():
            if a < 0 or a < min(COS_FLOOR, COS_FRACTION * typical):
                out[keys[i]] = "pointing elsewhere"
    elif len(sane) == 2 and cos[sane[0], sane[1]] < -COS_FLOOR:
        out.update({keys[i]: "in conflict" for i in sane})  # one of two is wrong; which, nobody can tell
    kept = [i for i, k in enumerate(keys) if k not in out]
    if kept:
        w = torch.tensor([weights[i] for i in kept], dtype=torch.float32)
        clip = torch.ones(len(kept))
        if ref and n >= 2:  # clipped against this round's members, never against history alone
            clip = (CLIP_RATIO * ref / scaled[kept].clamp_min(1e-30)).clamp(max=1.0)
        result = ((clip * w / w.sum())[:, None] * flat[kept]).sum(0)
    else:
        result = torch.zeros_like(flat[0])
    agg_norm2 = float(result @ result)
    dots = flat @ result
    for i, k in enumerate(keys):
        s = scores.setdefault(k, PartScores())
        s.parts += 1
        s.elements += flat.shape[1]
        s.norm2 += float(gram[i, i])
        s.dot += float(dots[i])
        s.agg_norm2 += agg_norm2
        if k in out:
            s.left_out += flat.shape[1]
            s.reasons[out[k]] = s.reasons.get(out[k], 0) + 1
            if out[k] != "in conflict":  # in a conflict of two, the honest one is left out too: no blame
                s.excluded += flat.shape[1]
        history.own[(k, part_index)] = sketches[i].clone()
    if kept:
        history.norms[part_index] = float(scaled[kept].median())
    history.average[part_index] = result[idx].clone()
    return result.reshape(parts[0].shape)

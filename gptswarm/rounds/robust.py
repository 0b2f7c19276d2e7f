"""The coordinator's robust aggregation, one part of the pseudo-gradient at a time.

A round's contributions arrive part by part (hivemind's all-reduce splits each tensor into parts
of at most half a megabyte); for each part the coordinator holds every member's copy
(memory: members x part, never members x model) and decides, before averaging it:

1. who is left out of this part, and why:
   - too large: its norm, per square root of its weight and per its weight alike (a pseudo-gradient
     grows with the tokens trained for it, linearly while its steps agree and as a random walk
     later), is more than NORM_RATIO times the median of the members' (with three members or more),
     or than the smaller of two and then (when known) also, per square root of its weight, more
     than NORM_RATIO times the previous round's median (of two, either may be the odd one: a
     member small for its tokens makes an honest peer look large); alone, per square root of its
     weight, more than HISTORY_RATIO times the previous round's median;
   - a copy: what only a copy has, never a direction that honest work produces. Two members whose
     parts are within COPY_DIST of each other (relative distance), or a member whose part is within
     COPY_DIST of its own previous contribution or of the previous round's average (estimated from
     count sketches kept between rounds), sent the same thing twice;
   - pointing elsewhere (three members or more): its agreement is below COS_FLOOR and below
     COS_FRACTION of the typical member's, and either significantly negative (below -Z_AGAINST
     noise deviations, where the typical member agrees by Z_AGREE or more: it points against the
     others), or not significantly positive (below Z_AGREE deviations: noise, a constant) in a part
     where the typical member agrees by more than Z_SIGNAL deviations (there is a direction to
     agree with) from a member whose standing is poor or unknown: its parts so far this round,
     taken together, do not agree with its peers' by Z_STANDING deviations (before STANDING_PARTS
     parts, its last round's standing counts); and a member whose standing is below -Z_AGAINST (its
     parts point against the others') is left out of any part it does not clearly agree with. Its
     agreement is its k-th best cosine
     with another member, k = ceil((m - 1) / 2) of the m members left: with an honest majority,
     every honest member has that many honest peers. A noise deviation is what the cosine of two
     unrelated vectors with these values scatters by, sqrt(sum a_i^2 b_i^2) / (|a| |b|), about
     1/sqrt(values) for dense parts. Honest members do fall to near-noise agreement in single parts
     (a top-k worker's stale error feedback, a worker whose batches differ): their standing keeps
     them in;
   - in conflict (exactly two members): their cosine is below -COS_FLOOR and below -Z_AGAINST
     noise deviations.
   In a part of fewer than MIN_PART values (a bias, a LayerNorm's weights), cosines say little:
   the norm rule applies there, a member left out of most of its values so far this round for
   what it sent is left out there too, for the same reason, and (three members or more) so is a
   member whose standing is below -Z_AGAINST.
2. agreement is not an attack: when every member of a part would be left out and some of them
   only for their direction (pointing elsewhere, in conflict), the rule has lost its footing, not
   found an attack: those members are averaged as they are (clipped), nobody is charged for the
   part, and the round's RoundStats says so (an event on the coordinator). A part stays out only
   when each member is out for what it is on its own: too large, or a copy.
3. the part's aggregate: the weighted mean (weights: the ledger's tokens) of the members kept,
   each first clipped to CLIP_RATIO times the reference where it is beyond it by both measures (an
   honest member that moved unusually far weighs as one that moved CLIP_RATIO times as far).

The thresholds come from honest swarms measured across the configurations operators pick
(bench/honest.py, bench/README.md "Honest swarms"): 2 and 4 workers, 2 to 100 inner steps per round,
blocks of 64 and 256, fp16, 8-bit and top-k. Measured there (every part of at least MIN_PART values,
every round): the closest two honest members came is a relative distance of HONEST["peer_dist"],
the closest an honest member came to its own previous contribution HONEST["own_dist"], and to the
previous average HONEST["average_dist"]; the largest honest norm ratio to the reference
HONEST["norm_ratio"]; the lowest honest standing HONEST["standing"] (in noise deviations).

Breakdown point: the norm reference is a median and an honest member's agreement only needs
ceil((m - 1) / 2) honest peers, so fewer than half of the members (by count) being hostile cannot
move either; a hostile member is left out wherever it is far from the honest ones in norm or
direction, and inside those bounds it is clipped and weighs like any other member. With two
members, a conflict is averaged (the rescue of 2.): an opposite vector of the same norm cancels
the other's part for that round and no more, and a norm beyond NORM_RATIO times the other's is
caught; with one, only a norm beyond HISTORY_RATIO times the previous round's median. The round's
safety gate (the coordinator refuses a theta that is not finite or whose validation loss jumps)
is the last line behind both.

Every member's scores are summed over the parts (PartScores) so that the round can flag the ones
left out of most of their values. Everything here is deterministic: the coordinator computes each
part once and sends every member the same bytes.
"""

import secrets
from dataclasses import dataclass, field

import torch

NORM_RATIO = 10.0  # a part more than this many times the reference norm is an outlier
HISTORY_RATIO = 30.0  # ... for a lone member, the previous round's median (early rounds grow fast: measured 4.5x
#                       for a whole pseudo-gradient between the first two rounds of a short warmup)
CLIP_RATIO = 3.0  # a kept part is clipped to this many times the reference norm
COS_FRACTION = 0.5  # a part less aligned than this fraction of the typical member's agreement ...
COS_FLOOR = 0.1  # ... and than this, in a part whose typical agreement is Z_SIGNAL noise deviations above 0 ...
Z_SIGNAL = 6.0
Z_AGAINST = 4.0  # ... is pointing elsewhere when it is this many deviations below 0 ...
Z_AGREE = 3.0  # ... or fewer than this above 0 from a member of poor standing: its parts so far this round
Z_STANDING = 4.0  # taken together agree with its peers' by fewer than this many deviations (its last round's,
STANDING_PARTS = 3  # while it has sent fewer than this many parts of MIN_PART values or more this round)
COPY_DIST = 0.01  # parts closer than this (|a - b| / |b|) are copies (honest, measured: 0.0285 at the closest)
SKETCH = 1024  # count-sketch buckets kept per part and member between rounds (a distance estimate within ~5%)
FLAG_FRACTION = 0.5  # a member left out of at least this fraction of its values is flagged for the round
MIN_PART = 1024  # in a smaller part (a bias, a LayerNorm), cosines say little: the norm rule and the member's larger parts decide
# what honest work looked like over the whole sweep (bench/results/honest.json; the thresholds above
# keep a margin from each)
HONEST = {"peer_dist": 0.0285, "own_dist": 0.0835, "average_dist": 0.1042, "norm_ratio": 6.7865, "standing": 2.32}
DIRECTION = ("pointing elsewhere", "in conflict")  # reasons that are about a member's direction only


@dataclass
class PartScores:
    """One member's scores over the parts of a round, counted in elements (parts differ in size:
    hivemind splits the vector tensor by tensor)."""
    parts: int = 0
    elements: int = 0
    left_out: int = 0  # elements of the parts it was left out of, for any reason
    excluded: int = 0  # ... for a reason of its own (not a conflict of two)
    reasons: dict = field(default_factory=dict)  # reason -> parts
    telling: int = 0  # parts of MIN_PART values or more (whose direction tells something)
    dots: dict = field(default_factory=dict)  # other member -> dot product with it over those parts
    noise2: dict = field(default_factory=dict)  # other member -> sum of a_i^2 b_i^2 over those parts

    def standing(self, others, k):
        """Its k-th best agreement with `others` over its telling parts so far, in noise deviations
        (dot / sqrt(sum a_i^2 b_i^2)); -inf with none."""
        z = sorted((self.dots[o] / max(self.noise2[o], 1e-60) ** 0.5 for o in others if o in self.dots),
                   reverse=True)
        return z[k - 1] if 1 <= k <= len(z) else float("-inf")
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


@dataclass
class RoundStats:
    """What the rule did to a whole round, counted in parts and values: the coordinator's health and
    events read it. observe: called with each part's PartView (the benchmark records them)."""
    parts: int = 0
    values: int = 0
    parts_left_out: int = 0  # parts some member was left out of
    values_left_out: int = 0  # member-values left out, summed over members
    member_values: int = 0  # member-values in all
    parts_lost: int = 0  # parts nobody reached: every member out for what it is on its own
    rescued: dict = field(default_factory=dict)  # part index -> the reasons every member would have been left out
    observe: object = None

    def left_out_fraction(self):
        return self.values_left_out / self.member_values if self.member_values else 0.0

    def rescue_summary(self, limit=3):
        items = sorted(self.rescued.items())
        shown = "; ".join(f"part {p}: {why}" for p, why in items[:limit])
        return f"{len(items)} part(s) averaged as they are, every member would have been left out ({shown}" + (
            ", ...)" if len(items) > limit else ")")


@dataclass
class PartView:
    """The measurements one part's decisions rest on (the benchmark records them to set thresholds)."""
    part_index: int
    size: int
    keys: list
    scaled: list  # norms per square root of weight
    ref: float  # the norm reference (None: none)
    peer_dist: list  # [(i, j, relative distance)] between members
    own_dist: dict  # i -> relative distance to its own previous contribution (sketches)
    average_dist: dict  # i -> relative distance to the previous round's average (sketches)
    agreement: dict  # i -> its k-th best cosine with the others
    typical: float = None
    sigma: float = None  # the noise deviation of a cosine in this part
    out: dict = field(default_factory=dict)
    rescued: bool = False


class History:
    """What the coordinator remembers between rounds, per part index: the median member norm, the
    average's count sketch, each worker's last count sketch. roundtrip(part): the average as the
    members receive it (the reply codec's round trip), which is what a replay of it would send.
    Threads: the node's event loop alone reads and writes it (the rule runs there, part by part;
    RoundReducer._reduce calls forget and end_round there too)."""

    def __init__(self, roundtrip=None, seed=None):
        self.norms, self.average, self.own = {}, {}, {}
        self.standing = {}  # worker -> its agreement with its peers over its last round, in noise deviations
        self.roundtrip = roundtrip or (lambda part: part)
        # the sketches' random signs: secret to this coordinator (a sender that knew them could shape a
        # replay whose sketch lies far from its original's), drawn once per part size and kept
        self.seed = secrets.randbits(62) if seed is None else seed
        self._signs = {}

    def forget(self, keep):
        """Drop the sketches and standing of workers not in `keep` (they left)."""
        self.own = {key: v for key, v in self.own.items() if key[0] in keep}
        self.standing = {k: v for k, v in self.standing.items() if k in keep}

    def end_round(self, scores):
        """The round's scores are final: each member's standing for the next round."""
        for k, s in scores.items():
            if s.telling:
                others = [o for o in scores if o != k]
                self.standing[k] = s.standing(others, max(1, len(scores) // 2))

    def standing_of(self, key, scores, others, k):
        """How much the member's parts so far this round (or, before STANDING_PARTS of them, its last
        round's) agree with its peers', taken together, in noise deviations; None: no evidence yet."""
        s = scores.get(key)
        if s is not None and s.telling >= STANDING_PARTS:
            return s.standing(others, k)
        return self.standing.get(key)

    def signs(self, d):
        """The sketches' random signs for parts of d values (by size only: parts of one size share
        them, and most parts are of one size)."""
        signs = self._signs.get(d)
        if signs is None:
            g = torch.Generator().manual_seed((self.seed + d) % (1 << 63))
            signs = self._signs[d] = torch.randint(2, (d,), generator=g).float().mul_(2).sub_(1)
        return signs

    def sketch(self, flat):
        """Sketches (rows, SKETCH buckets) of the rows of flat (n, d): value j lands in bucket
        j mod SKETCH with a random sign, the same for every round and member, so that the distance
        between two sketches estimates the distance between the parts (the signs make every other
        value's share of a bucket cancel in expectation), sparse ones included."""
        n, d = flat.shape
        signed = flat * self.signs(d)
        if d % SKETCH:
            signed = torch.nn.functional.pad(signed, (0, -d % SKETCH))
        return signed.view(n, -1, SKETCH).sum(1)


BLOCK_VALUES = 1 << 17  # _statistics reads the members' copies a block at a time, this many values in all (in
#                        cache), each member's block 8 to 64 sketch widths (measured best on this machine: bench.reduce)


def _statistics(flats, signs, telling):
    """One pass over the members' copies of a part, a block of values at a time (the members' blocks
    stacked in a buffer that stays in cache, instead of every member's copy read once per statistic):
    gram (n, n) of every pair's dot product; sqg (n, n) of every pair's sum a_i^2 b_i^2 (telling
    parts only, else None); the members' sketches (n, SKETCH), as History.sketch computes them."""
    n, d = len(flats), flats[0].numel()
    gram, sketches = torch.zeros(n, n), torch.zeros(n, SKETCH)
    sqg = torch.zeros(n, n) if telling else None
    block = max(8 * SKETCH, min(64 * SKETCH, BLOCK_VALUES // n // SKETCH * SKETCH))
    buffer = torch.empty(n * block)
    for start in range(0, d, block):
        stop = min(d, start + block)
        width = stop - start
        rows = torch.stack([f[start:stop] for f in flats], out=buffer[:n * width].view(n, width))
        gram.addmm_(rows, rows.T)
        if telling:
            sq = rows * rows
            sqg.addmm_(sq, sq.T)
        signed = rows * signs[start:stop]
        if width % SKETCH:
            signed = torch.nn.functional.pad(signed, (0, -width % SKETCH))
        sketches += signed.view(n, -1, SKETCH).sum(1)
    return gram, sqg, sketches


def _rel_dist(a, b):
    """|a - b| / |b|; inf where either is 0 (nothing there to copy, or nothing sent)."""
    na, nb = float(a.norm()), float(b.norm())
    return float((a - b).norm()) / nb if na > 0 and nb > 0 else float("inf")


def aggregate_part(part_index, parts, weights, keys, history, scores, stats=None, roundtrip=None, scales=None):
    """The robust aggregate of one part. parts: [tensor] (the members' copies, same shape);
    weights: [float > 0]; keys: [member key (worker id)]; history: History (read, and updated with
    this round's sketches and norms); scores: {key: PartScores} (updated); stats: RoundStats
    (updated), or None; roundtrip(average): the average as members receive it (default:
    history.roundtrip); scales: [float] a member's weight is scaled by in the aggregate alone (its
    standing: coordinator/scoring.py), never in the judgement of its norm."""
    flats = [p.reshape(-1).float() for p in parts]
    n, d = len(flats), flats[0].numel()
    telling = d >= MIN_PART
    # every norm, every pair's cosine and noise scale, every member's sketch: one pass over the copies
    gram, sqg, sketches = _statistics(flats, history.signs(d), telling)
    norms = gram.diagonal().clamp_min(0).sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    # a pseudo-gradient grows with the tokens trained for it, linearly while its steps agree (early
    # training) and as a random walk later; an honest member can be either, and members of one round
    # differ in tokens by 40x and more (a slow worker's one step beside a fast one's 40). So norms are
    # compared per square root of the member's weight and per its weight, and a member is too large
    # (or clipped) only when it is beyond the reference by both
    w_all = torch.tensor(weights, dtype=torch.float32).clamp_min(1e-30)
    scaled, linear = norms / w_all.sqrt(), norms / w_all
    ref_linear = None
    if n >= 3:
        ref, ratio, ref_linear = float(scaled.median()), NORM_RATIO, float(linear.median())
    elif n == 2:
        ref, ratio, ref_linear = float(scaled.min()), NORM_RATIO, float(linear.min())
    else:
        ref, ratio = history.norms.get(part_index), HISTORY_RATIO
    out = {}  # index -> reason it is left out of this part
    # with two members, one far from the other may be either one's oddity (a worker whose pseudo-gradient
    # is small for its tokens makes the other look large): the previous round breaks the tie, and the
    # larger is too large only if it is also far beyond what members sent then
    before = history.norms.get(part_index) if n == 2 else None
    if ref:
        for i in range(n):
            if scaled[i] > ratio * ref and (ref_linear is None or linear[i] > ratio * ref_linear) and (
                    before is None or scaled[i] > NORM_RATIO * before):
                out[i] = "too large"
    view = PartView(part_index, d, list(keys), scaled.tolist(), ref, [], {}, {}, {})
    g, norm = gram.tolist(), norms.tolist()  # (Python floats: n^2 of them are read one by one below)
    if telling:
        for i in range(n):
            for j in range(i + 1, n):
                if not (norm[i] > 0 and norm[j] > 0):
                    continue  # nothing sent is nobody's copy
                # |a - b| relative to the larger of the two (a copy is close to the original whichever is which)
                dist = max(g[i][i] + g[j][j] - 2 * g[i][j], 0.0) ** 0.5 / max(norm[i], norm[j])
                view.peer_dist.append((i, j, dist))
                if dist < COPY_DIST:
                    out.setdefault(i, "a copy")
                    out.setdefault(j, "a copy")
        previous = history.average.get(part_index)
        for i, k in enumerate(keys):
            own = history.own.get((k, part_index))
            if own is not None:
                view.own_dist[i] = _rel_dist(sketches[i], own)
            if previous is not None:
                view.average_dist[i] = _rel_dist(sketches[i], previous)
            if min(view.own_dist.get(i, 1.0), view.average_dist.get(i, 1.0)) < COPY_DIST:
                out.setdefault(i, "a copy")
    sane = [i for i in range(n) if i not in out] if telling else []
    if len(sane) >= 2:
        # the noise deviation of a cosine between two unrelated vectors with these members' value
        # distributions: sqrt(sum a_i^2 b_i^2) / (|a| |b|), its median over the pairs
        noise = (sqg.clamp_min(0).sqrt() / (norms[:, None] * norms[None, :]).clamp_min(1e-30)).tolist()
        pairs = [noise[a][b] for x, a in enumerate(sane) for b in sane[x + 1:]]
        view.sigma = sorted(pairs)[(len(pairs) - 1) // 2]
    if len(sane) >= 3:
        # each member's k-th best agreement with the others, k = what an honest majority guarantees
        k = len(sane) // 2
        view.agreement = {i: float(cos[i, [j for j in sane if j != i]].sort(descending=True).values[k - 1])
                          for i in sane}
        view.typical = sorted(view.agreement.values())[(len(sane) - 1) // 2]
        signal = view.typical > Z_SIGNAL * view.sigma  # a direction to agree with
        for i, a in view.agreement.items():
            standing = history.standing_of(keys[i], scores, [keys[j] for j in sane if j != i], k)
            weak = a < min(COS_FLOOR, COS_FRACTION * view.typical)
            if weak and view.typical > Z_AGREE * view.sigma and a < -Z_AGAINST * view.sigma:
                out[i] = "pointing elsewhere"  # against the others
            elif signal and weak and a < Z_AGREE * view.sigma and (standing is None or standing < Z_STANDING):
                out[i] = "pointing elsewhere"  # nowhere in particular (noise, a constant), and no better before
            elif standing is not None and standing < -Z_AGAINST and a < Z_AGREE * view.sigma:
                out[i] = "pointing elsewhere"  # its parts so far point against the others', and this one agrees no better
    elif len(sane) == 2 and cos[sane[0], sane[1]] < -max(COS_FLOOR, Z_AGAINST * view.sigma):
        out.update({i: "in conflict" for i in sane})  # one of two is wrong; which, nobody can tell
    if not telling:
        # a small part's direction says nothing; the member's larger parts so far do: one left out of
        # most of them for what it sent is left out here too, and so is one whose parts point against
        # the others'
        for i in range(n):
            s = scores.get(keys[i])
            own = {r: c for r, c in s.reasons.items() if r != "in conflict"} if s is not None else {}
            if i in out:
                continue
            if own and s.excluded >= FLAG_FRACTION * s.elements:
                out[i] = max(own, key=own.get)
            elif n >= 3:
                z = history.standing_of(keys[i], scores, [keys[j] for j in range(n) if j != i], n // 2)
                if z is not None and z < -Z_AGAINST:
                    out[i] = "pointing elsewhere"
    kept = [i for i in range(n) if i not in out]
    if not kept and any(r in DIRECTION for r in out.values()):
        # every member would be left out, some only for their direction: agreement is not an attack
        view.rescued = True
        reasons = sorted({r for r in out.values() if r in DIRECTION})
        kept = [i for i in range(n) if out[i] in DIRECTION]
        for i in kept:
            del out[i]
        if stats is not None:
            stats.rescued[part_index] = " and ".join(reasons)
    view.out = {keys[i]: r for i, r in out.items()}
    coef = torch.zeros(n)  # each member's share of the aggregate: 0 when left out
    if kept:
        w = torch.tensor([weights[i] * (scales[i] if scales else 1.0) for i in kept], dtype=torch.float32)
        clip = torch.ones(len(kept))
        if ref and n >= 2:  # clipped against this round's members, never against history alone
            clip = torch.maximum(CLIP_RATIO * ref / scaled[kept].clamp_min(1e-30),
                                 CLIP_RATIO * ref_linear / linear[kept].clamp_min(1e-30)).clamp(max=1.0)
        coef[kept] = clip * w / w.sum()
    result = torch.zeros(d)
    for i in kept:  # in the members' order: the same bits wherever it is computed
        result.add_(flats[i], alpha=float(coef[i]))
    agg_norm2 = float(result @ result)
    dots = gram @ coef  # each member's dot product with the aggregate
    sq2 = sqg.tolist() if telling else None
    dot = dots.tolist()
    for i, k in enumerate(keys):
        s = scores.setdefault(k, PartScores())
        if telling:  # the evidence of its standing, after this part's decisions
            s.telling += 1
            for j, other in enumerate(keys):
                if j != i:
                    s.dots[other] = s.dots.get(other, 0.0) + g[i][j]
                    s.noise2[other] = s.noise2.get(other, 0.0) + sq2[i][j]
        s.parts += 1
        s.elements += d
        s.norm2 += g[i][i]
        s.dot += dot[i]
        s.agg_norm2 += agg_norm2
        if i in out:
            s.left_out += d
            s.reasons[out[i]] = s.reasons.get(out[i], 0) + 1
            if out[i] != "in conflict":  # in a conflict of two, the honest one is left out too: no blame
                s.excluded += d
        history.own[(k, part_index)] = sketches[i].clone()
    if kept:
        history.norms[part_index] = float(scaled[kept].median())
    history.average[part_index] = history.sketch((roundtrip or history.roundtrip)(result)[None])[0]
    if stats is not None:
        stats.parts += 1
        stats.values += d
        stats.member_values += n * d
        stats.values_left_out += len(out) * d
        stats.parts_left_out += bool(out)
        stats.parts_lost += not kept
        if stats.observe is not None:
            stats.observe(view)
    return result.reshape(parts[0].shape)

"""Credit for work done: every contribution is scored by what it does to the loss, per token its
worker claimed (docs/architecture.md "Credit for work done").

A member that sent the pseudo-gradient d (theta_global - its theta after training) moves the loss on
a sample S, at first order, by -<grad L_S(theta_global), d>. Its score on S is that decrease per
token it claimed in the round. The coordinator computes two reference gradients at theta_global
before the round's reduce: on rows drawn (with a secret seed) from the shards that member claimed
tokens on in the round, one sample per member ("leased"), and on rows from the validation shards,
which no worker is ever leased, one sample for the round ("off"). The reducer takes each member's
dot products with them as that member's parts arrive (Probe.take, two multiply-adds per value), so
nothing of a member's contribution is kept. Each sample holds SAMPLE_FRACTION of the tokens it is
scored against (the member's claim, the round's), between MIN_SAMPLE and MAX_SAMPLE tokens: with
the backward pass the coordinator's share of the compute is about 2 x SAMPLE_FRACTION of the swarm's
(more in small rounds, where MIN_SAMPLE is more than that fraction).

A round's ratio for a member is its score over the median member's, the mean of the two samples'
weighed by their tokens (clipped to CLIP: one noisy round cannot make or break a worker). A member
that claimed less than SMALL_CLAIM of the median member's tokens is not scored (one step's
pseudo-gradient is noise per token: met in a test swarm, where a 124-token member became the
median), and a round with fewer than 2 scored members, or whose median is not a loss decrease,
scores nobody. One round's ratio is noisy (an honest member's ranged from -2 to 2.5 in a 4-worker
swarm of 8-step rounds, late in training, where the gradient is small), so a worker is judged by
its standing: the mean of its last WINDOW ratios (the ledger keeps them). From its EVIDENCE-th
scored round, a standing below FLAG_BELOW flags the contribution like any outlier (no credit, its
leases go back, the flag counts towards quarantine) and takes back the credit of the rounds the
standing is the mean of; otherwise its credit, and its weight in later rounds, scale with the
standing up to FULL_AT. Measured (bench/README.md "Credit for work done"): honest standings >= 0.43,
a worker that sends a tenth of its work or zeros flagged at its third round with no credit.

What scoring cannot see, and replay (issue 24's second half) is for: a worker whose pseudo-gradient
does as much for the loss as honest work of its claim would, without having done that work.
Reducer nodes do not score (they hold no reference gradients): rounds they reduce score nobody.
The leased references are held through the reduce, one per member: beyond LEASED_BYTES of them, a
secret random draw of members gets one each round (the others are scored on the validation sample).
"""

from __future__ import annotations

import math
import secrets
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gptswarm.mingpt_core.data import Batches

if TYPE_CHECKING:
    from gptswarm.coordinator.ledger import Ledger
    from gptswarm.mingpt_core.model import GPT

SAMPLE_FRACTION = 0.02  # tokens sampled per token scored against, for each of the two samples
MIN_SAMPLE = 4096  # a sample's tokens, at least (smaller ones are noise: measured in tests/test_credit.py) ...
MAX_SAMPLE = 1 << 17  # ... and at most (a backward pass each, at the coordinator)
CLIP = (-1.0, 2.0)  # a round's ratio is clipped to this
SMALL_CLAIM = 0.25  # a member that claimed less than this fraction of the round's median claim is not scored
WINDOW = 5  # a worker's standing: the mean of its last WINDOW ratios ...
EVIDENCE = 3  # ... judged once it has this many
FLAG_BELOW = 0.25  # a standing below this is flagged
FULL_AT = 0.5  # credit and weight scale with the standing up to this
MIN_SCALE = 0.01  # ... the weight down to this (a round of members weighing nothing would have no average)
LEASED_BYTES = 2 << 30  # the members' leased references held at once, at most (fp32: 4 of gpt2 124M's)


@dataclass(frozen=True)
class Score:
    """A member's score in one round. leased, off: its loss decrease per claimed token on each
    sample (None where not sampled); ratio: the round's ratio to the median member (None: the round
    scored nobody); standing: the mean of its last WINDOW ratios, this one included; rounds: how many
    those are; factor: what its credit is scaled by; flagged: its standing is below FLAG_BELOW."""
    leased: float | None
    off: float | None
    ratio: float | None
    standing: float | None
    rounds: int
    factor: float
    flagged: bool

    def summary(self) -> str:
        return (f"scored {self.standing:.2f} of the median member's loss decrease per claimed token over its last "
                f"{self.rounds} round(s) (flagged below {FLAG_BELOW})")


def factor_of(standing: float | None) -> float:
    """What a worker of this standing is credited and weighed with (1: no evidence yet)."""
    return 1.0 if standing is None else min(1.0, max(0.0, standing / FULL_AT))


class Probe:
    """A round's reference gradients, flat, in the order the reducer receives parts; the reducer
    takes each member's dot products with them as its parts arrive.

    Threads: built by the round loop before the reduce; then only the reducer's event loop touches
    it (bind, take) until reduce() returns; then the round loop reads `dots` (handed over by the
    return)."""

    def __init__(self, leased: dict[str, torch.Tensor], off: torch.Tensor, sample_tokens: dict[str, int]):
        self.leased, self.off, self.sample_tokens = leased, off, sample_tokens
        self.keys: list[str | None] = []
        self.offsets: list[int] = [0]
        self.dots: dict[str, list[float]] = {}  # worker id -> [leased, off]
        self.broken = ""  # why the dots mean nothing (the parts did not tile the reference)

    def bind(self, keys: list[str | None], part_sizes: list[int]) -> None:
        """keys: the worker id of each sender index (None: not a member); part_sizes: the parts' values."""
        self.keys = list(keys)
        for n in part_sizes:
            self.offsets.append(self.offsets[-1] + n)
        if self.offsets[-1] != self.off.numel():
            self.broken = f"the parts hold {self.offsets[-1]} values, the reference {self.off.numel()}"
        self.dots = {k: [0.0, 0.0] for k in self.keys if k is not None}

    def take(self, sender: int, part_index: int, part: torch.Tensor) -> None:
        key = self.keys[sender] if 0 <= sender < len(self.keys) else None
        if key is None or self.broken:
            return
        a, b = self.offsets[part_index], self.offsets[part_index + 1]
        flat = part.reshape(-1).float()
        d = self.dots[key]
        leased = self.leased.get(key)
        if leased is not None:
            d[0] += float(flat @ leased[a:b])
        d[1] += float(flat @ self.off[a:b])


class Scorer:
    """Builds each round's Probe and judges its dot products. shard_set, train_shards: the run's
    data (leases index train_shards); seq: a sample row's length; names: theta's names, in the
    averaged order. Threads: the round loop alone."""

    def __init__(self, *, shard_set: Any, train_shards: list, seq: int, names: list[str], ledger: Ledger,
                 fraction: float = SAMPLE_FRACTION):
        self.shard_set, self.train_shards, self.seq, self.names = shard_set, train_shards, seq, names
        self.ledger, self.fraction = ledger, fraction
        self.val_shards = shard_set.split("val")

    def _rows(self, tokens: int) -> int:
        return math.ceil(max(MIN_SAMPLE, min(MAX_SAMPLE, self.fraction * tokens)) / self.seq)

    def _gradient(self, model: GPT, shards: list, rows: int) -> torch.Tensor:
        """grad L at the model's weights, on `rows` sequences drawn from shards with a secret seed."""
        x, y = Batches(shards, self.shard_set, self.seq, rows, seed=secrets.randbits(62)).next()
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            _, loss = model(x, y)
            loss.backward()
        params, state = dict(model.named_parameters()), model.state_dict()
        grads = [params[n].grad if n in params else None for n in self.names]
        flat = torch.cat([(g if g is not None else torch.zeros(tuple(state[n].shape))).reshape(-1).float()
                          for n, g in zip(self.names, grads)])
        model.zero_grad(set_to_none=True)
        return flat

    def probe(self, model: GPT, round_: int, members: dict[str, int]) -> Probe | None:
        """The round's Probe for members {worker id: claimed tokens}, at the model's weights (theta_global;
        model is the round loop's own); None when there is nothing to score."""
        scored = {w: t for w, t in members.items() if t > 0}
        if len(scored) < 2 or not self.val_shards:
            return None
        shards = self.ledger.claimed_shards(round_, list(scored))
        # one reference per member is held through the reduce: past LEASED_BYTES, a random few members
        # (a secret draw each round) get their leased sample, every member the validation one
        budget = max(1, LEASED_BYTES // (4 * sum(v.numel() for v in model.state_dict().values())))
        draw = sorted(scored, key=lambda w: secrets.randbits(32))[:budget]
        was_training = model.training
        model.eval()  # no dropout: the gradient of the loss itself
        try:
            leased, sample_tokens = {}, {}
            for w, t in ((w, scored[w]) for w in draw):
                mine = [self.train_shards[i] for i in shards.get(w, ()) if 0 <= i < len(self.train_shards)]
                if mine:
                    rows = self._rows(t)
                    leased[w], sample_tokens[w] = self._gradient(model, mine, rows), rows * self.seq
            rows = self._rows(sum(scored.values()))
            off = self._gradient(model, self.val_shards, rows)
            sample_tokens[""] = rows * self.seq
        finally:
            model.train(was_training)
        return Probe(leased, off, sample_tokens)

    def judge(self, round_: int, probe: Probe | None, members: dict[str, int]) -> dict[str, Score]:
        """Each member's Score from the probe's dot products ({worker id: claimed tokens}), with its
        last ratios from the ledger (the commit records this round's)."""
        per_token: dict[str, tuple[float | None, float | None]] = {}
        ratios: dict[str, float] = {}
        if probe is not None and not probe.broken:
            # a member that brought a small fraction of the typical member's tokens (one step after a
            # resynchronization, say) is noise per token: it is neither scored nor a reference
            typical = statistics.median([t for t in members.values() if t > 0] or [0])
            for w, t in members.items():
                d = probe.dots.get(w)
                if d is not None and t > 0 and t >= SMALL_CLAIM * typical:
                    per_token[w] = (d[0] / t if w in probe.leased else None, d[1] / t)
        if probe is not None and len(per_token) >= 2:
            medians: list[float] = []
            for i in (0, 1):
                values = [x for v in per_token.values() if (x := v[i]) is not None]
                medians.append(statistics.median(values) if values else 0.0)
            for w, v in per_token.items():  # the two samples' ratios, weighed by their tokens
                sizes = (probe.sample_tokens.get(w, 0), probe.sample_tokens[""])
                rs = [(x / medians[i], sizes[i]) for i in (0, 1) if (x := v[i]) is not None and medians[i] > 0]
                if rs:
                    ratio = sum(r * n for r, n in rs) / sum(n for _, n in rs)
                    ratios[w] = min(CLIP[1], max(CLIP[0], ratio))
        history = self.ledger.score_history([w for w in members], WINDOW - 1)
        out = {}
        for w in members:
            past = history.get(w, [])
            window = ([ratios[w]] if w in ratios else []) + past
            standing = sum(window) / len(window) if window else None
            # flagged on this round's evidence only (a round that scored nobody flags nobody)
            flagged = w in ratios and standing is not None and len(window) >= EVIDENCE and standing < FLAG_BELOW
            leased, off = per_token.get(w, (None, None))
            out[w] = Score(leased, off, ratios.get(w), standing, len(window), 0.0 if flagged else factor_of(standing),
                           flagged)
        return out

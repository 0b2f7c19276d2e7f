"""Credit for work done: does scoring (coordinator/scoring.py) catch a worker that does less than it
claims, and leave honest workers alone?

Each row is a swarm run in one process, as bench/honest.py runs one: workers train their inner steps
with the product's Trainer from theta_global on a shard of their own each round (a lease: the
text's ShardSet, as the coordinator cuts it), their pseudo-gradients go through the run's codec part
by part (hivemind's TensorPartContainer), and the coordinator's Scorer builds the round's Probe at
theta_global, takes every part's dot products as the reducer does, and judges. Credit, weight in
the next rounds (the standing's factor), flags, the revocation of a flagged worker's last rounds'
credit and the quarantine (flagged in 2 of its last 5 rounds) follow the coordinator's rules; the
average is the weighted mean (scoring alone: the robust rule would leave the freerider's zeros out
before any score). Only the network and the ledger's SQL are left out.

Rows: honest swarms (2 and 4 workers, the 4 at 0.5x/1x/1x/1.5x the inner steps; 8 and 32 steps;
blocks 64 and 256; 8-bit and top-k; 512 tokens per inner step), 3 honest workers beside one that
claims every token but:
  lazy      sends a tenth of its pseudo-gradient      partial   half of it
  freeride  sends zeros                               offdata   trains on another text (the repository's docs)
Per row: honest flags, the attacker's first flag (rounds after joining), its credit over its claims,
validation loss against the same swarm without it, and the cost of scoring (the last rows: rounds of
an operator's size, 32 inner steps of 8,192 tokens per worker, as the default gpt-mini run has
16,384): the sample tokens
(forward and backward at the coordinator) over the tokens the swarm trained, and its wall time
over the workers'.

    python -m bench.credit --text ../shared/data/tinyshakespeare.txt [--rounds 30] [--quick]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROUNDS = 30
ATTACKS = ("lazy", "partial", "freeride", "offdata")
SPEEDS = {2: (1.0, 1.0), 3: (1.0, 1.0, 1.0), 4: (0.5, 1.0, 1.0, 1.5)}
BATCH = {64: 8, 256: 2}  # sequences per inner step (512 tokens either way)
QUARANTINE = (2, 5)  # flagged in 2 of its last 5 rounds (the coordinator's defaults)
REPLAY_DRAW = 0.2  # members drawn for a replay here: enough replays to measure (the cost is reported at ...
REPLAY_FRACTION = 0.005  # ... the coordinator's default --replay-fraction)


def configurations(quick=False):
    if quick:
        return [dict(workers=3, steps=8, block=64, codec="8bit", attack=a) for a in (None, "lazy")]
    honest = [dict(workers=w, steps=s, block=b, codec=c) for w in (2, 4) for s in (8, 32) for b in (64, 256)
              for c in ("8bit", "topk")]
    attacks = [dict(workers=3, steps=s, block=64, codec="8bit", attack=a) for s in (8, 32) for a in (None, *ATTACKS)]
    # rounds of an operator's size for the cost of scoring: 32 steps of 8,192 tokens each per worker
    sized = [dict(workers=3, steps=32, block=256, codec="8bit", batch=32, attack=a, rounds=12) for a in (None, "lazy")]
    return honest + attacks + sized


def name_of(c):
    return (f"{c['workers']}w {c['steps']} steps block {c['block']} {c['codec']}"
            + (f" batch {c['batch']}" if c.get("batch") else "") + (f" + {c['attack']}" if c.get("attack") else ""))


class History:
    """What the Scorer asks the ledger: the shards each member claimed this round, its last ratios."""

    def __init__(self):
        self.claimed, self.ratios = {}, {}

    def claimed_shards(self, round_, worker_ids):
        return {w: [self.claimed[w]] for w in worker_ids if w in self.claimed}

    def score_history(self, worker_ids, n):
        return {w: self.ratios.get(w, [])[:n] for w in worker_ids}


def simulate(config, text, rounds, records):
    import numpy as np
    import torch
    from hivemind.averaging.partition import TensorPartContainer
    from hivemind.compression import CompressionInfo

    from gptswarm.coordinator.scoring import WINDOW, Scorer, factor_of
    from gptswarm.mingpt_core.data import Batches, ShardSet, text_shards
    from gptswarm.mingpt_core.model import GPT, GPTConfig
    from gptswarm.mingpt_core.trainer import TrainConfig, Trainer, evaluate_loss
    from gptswarm.rounds import DEFAULT_TOPK, outer_defaults
    from gptswarm.rounds.codecs import ErrorFeedback, decode
    from gptswarm.rounds.hivemind_ext import CODECS as CODEC_PAIRS
    from gptswarm.rounds.outer import outer_step, pseudo_gradient
    from gptswarm.rounds.replay import (
        SAMPLE,
        TOLERANCE,
        Recorder,
        claims_match,
        distance,
        parse,
        rerun,
    )
    from gptswarm.rounds.theta import theta_views

    torch.set_num_threads(1)
    block, codec, attack = config["block"], config["codec"], config.get("attack")
    batch = config.get("batch") or BATCH[block]
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    shard_set = text_shards([stoi[c] for c in text], len(chars), block, shard_tokens=16384)
    train, val = shard_set.split("train"), shard_set.split("val")
    docs = "".join(p.read_text() for p in sorted((HERE.parent / "docs").glob("*.md")))
    other = ShardSet(text_shards([stoi[c] for c in docs if c in stoi], len(chars), block, shard_tokens=16384,
                                 val_fraction=0.01).split("train"), len(chars))
    torch.manual_seed(1337)
    model_cfg = GPTConfig.from_preset("gpt-nano", len(chars), block)
    global_model = GPT(model_cfg)
    theta = theta_views(global_model)
    names = list(theta)
    momentum = {k: torch.zeros_like(v) for k, v in theta.items()}
    lr, mu = outer_defaults(codec)
    steps = [max(1, round(config["steps"] * f)) for f in SPEEDS[config["workers"]]]
    keys = [f"w{i}" for i in range(len(steps))]
    if attack:
        steps.append(config["steps"])
        keys.append("bad")
    workers = {}
    for k, n in zip(keys, steps):
        m = GPT(model_cfg)
        t = Trainer(m, TrainConfig(batch_size=batch, max_iters=rounds * sum(steps), learning_rate=1e-3, min_lr=1e-4,
                                   warmup_iters=100))
        workers[k] = dict(model=m, trainer=t, steps=n, feedback=ErrorFeedback(DEFAULT_TOPK) if codec == "topk" else None,
                          claimed=0, credited={}, flags=[], quarantined=None, first_flag=None,
                          recorder=Recorder(Path(records) / k), verified=set(), first_replay_failed=None,
                          distances=[])
    send, _ = CODEC_PAIRS[codec](DEFAULT_TOPK)
    history = History()
    scorer = Scorer(shard_set=shard_set, train_shards=train, seq=block, names=names, ledger=history)
    val_batches = list(Batches(val, shard_set, block, 32, seed=7).next() for _ in range(8))
    rng = np.random.default_rng(0)
    draws = np.random.default_rng(1)  # the replays' draw
    out = {"config": config, "rounds": rounds, "honest_flagged": 0, "val_loss": {}, "min_honest_standing": None,
           "sample_tokens": 0, "trained_tokens": 0, "scoring_seconds": 0.0, "training_seconds": 0.0,
           "member_rounds": 0, "replays": 0, "replay_seconds": 0.0, "honest_replays_failed": 0}
    for r in range(rounds):
        contributions, members = {}, {}
        for k, w in workers.items():
            if w["quarantined"] is not None or (k == "bad" and r == 0):  # it joins a running swarm
                continue
            shard = int(rng.integers(len(train)))
            history.claimed[k] = shard
            source = other.shards if (k == "bad" and attack == "offdata") else [train[shard]]
            data = Batches(source, shard_set, block, batch, seed=1000 * r + int(rng.integers(1000)))
            w["model"].load_state_dict(global_model.state_dict())
            w["recorder"].start(w["trainer"])
            w["lease"] = (f"{r}:{shard}", train[shard].tokens)
            t0 = time.perf_counter()
            for _ in range(w["steps"]):
                w["recorder"].step(w["lease"][0], data)
                w["trainer"].train_step(*data.next())
            out["training_seconds"] += time.perf_counter() - t0
            out["member_rounds"] += 1
            grad = pseudo_gradient(theta, theta_views(w["model"]))
            residual = dict(w["feedback"].residual) if w["feedback"] is not None else None
            if w["feedback"] is not None:
                grad = w["feedback"].sparsify(grad)
            w["recorder"].seal(r, w["trainer"], residual)
            if k == "bad" and attack in ("lazy", "partial", "freeride"):
                grad = {n: v * {"lazy": 0.1, "partial": 0.5, "freeride": 0.0}[attack] for n, v in grad.items()}
            tokens = w["steps"] * batch * block
            out["trained_tokens"] += tokens
            container = TensorPartContainer([grad[n] for n in names], peer_fractions=(1.0,), compression=send)
            contributions[k] = [decode(send.compress(p, CompressionInfo.from_tensor(p)), p.numel())
                                for p in container.get_raw_input_parts(0)]
            members[k] = tokens
        t0 = time.perf_counter()
        probe = scorer.probe(global_model, r, members)
        if probe is not None:
            order = list(members)
            probe.bind([None] + order, [p.numel() for p in contributions[order[0]]])
            for i, k in enumerate(order):
                for j, part in enumerate(contributions[k]):
                    probe.take(1 + i, j, part)
            out["sample_tokens"] += sum(probe.sample_tokens.values())
        scores = scorer.judge(r, probe, members)
        out["scoring_seconds"] += time.perf_counter() - t0
        replayed = {}  # the credited members drawn: replayed from their records, as a replay job does
        for k in members:
            if scores[k].flagged or scores[k].factor <= 0 or draws.random() >= REPLAY_DRAW:
                continue
            w = workers[k]
            t0 = time.perf_counter()
            tensors, meta = parse(w["recorder"].path(r).read_bytes())
            assert not claims_match(meta, {w["lease"][0]: members[k]}, batch * block)
            again = rerun(tensors, meta, {n: theta[n].clone() for n in names}, model=GPT(model_cfg),
                          train=w["trainer"].cfg, shard_set=shard_set, tokens=dict([w["lease"]]),
                          sparsify_fraction=DEFAULT_TOPK if codec == "topk" else None, codec=send,
                          part_sizes=[p.numel() for p in contributions[k]])
            idx = torch.randperm(again.numel())[:SAMPLE]
            replayed[k] = distance(torch.cat([p.reshape(-1) for p in contributions[k]])[idx], again[idx])
            out["replay_seconds"] += time.perf_counter() - t0
            out["replays"] += 1
        weights = {}
        for k, s in scores.items():
            w = workers[k]
            if s.ratio is not None:
                history.ratios[k] = [s.ratio] + history.ratios.get(k, [])
            w["claimed"] += members[k]
            w["flags"].append(s.flagged)
            if s.flagged:
                w["first_flag"] = w["first_flag"] or len(w["flags"])
                for past in sorted(w["credited"])[-(WINDOW - 1):]:  # the rounds its standing judged
                    w["credited"][past] = 0
                if sum(w["flags"][-QUARANTINE[1]:]) >= QUARANTINE[0]:
                    w["quarantined"] = len(w["flags"])
            else:  # in the average, weighed by its standing before this round (the group's, at the round's end)
                w["credited"][r] = members[k] * s.factor
                weights[k] = members[k] * factor_of(w.get("standing"))
            if k in replayed:
                w["distances"].append(replayed[k])
                if replayed[k] <= TOLERANCE:
                    w["verified"].add(r)
                else:  # every unverified credit goes, and it is quarantined (ledger/replays.py)
                    out["honest_replays_failed"] += k != "bad"
                    w["first_replay_failed"] = w["first_replay_failed"] or len(w["flags"])
                    w["credited"] = {p: c if p in w["verified"] else 0 for p, c in w["credited"].items()}
                    w["quarantined"] = w["quarantined"] or len(w["flags"])
            w["standing"] = s.standing
            if k != "bad" and s.standing is not None:
                out["honest_flagged"] += s.flagged
                low = out["min_honest_standing"]
                out["min_honest_standing"] = round(s.standing if low is None else min(low, s.standing), 3)
        total = sum(weights.values())
        if total > 0:
            flat = sum(torch.cat([p.reshape(-1) for p in contributions[k]]) * (wt / total) for k, wt in weights.items())
            avg, offset = {}, 0
            for n in names:
                avg[n] = flat[offset:offset + theta[n].numel()].view_as(theta[n])
                offset += theta[n].numel()
            outer_step(theta, momentum, avg, lr, mu)
        for k, w in workers.items():
            if w["feedback"] is not None and k in weights:
                w["feedback"].commit()
        if (r + 1) % 10 == 0 or r + 1 == rounds:
            out["val_loss"][r + 1] = round(evaluate_loss(global_model, val_batches), 4)
    if attack:
        bad = workers["bad"]
        out["attacker"] = {"first_flag": bad["first_flag"], "quarantined_after": bad["quarantined"],
                           "claimed": bad["claimed"], "credited": round(sum(bad["credited"].values())),
                           "credit_share": round(sum(bad["credited"].values()) / max(1, bad["claimed"]), 4),
                           "first_replay_failed": bad["first_replay_failed"],
                           "replay_distances": [round(d, 4) for d in bad["distances"]]}
    honest_claims = [(w["claimed"], sum(w["credited"].values())) for k, w in workers.items() if k != "bad"]
    out["honest_credit_share"] = round(min(c / max(1, t) for t, c in honest_claims), 4)
    out["sample_share"] = round(out["sample_tokens"] / max(1, out["trained_tokens"]), 4)
    out["time_share"] = round(out["scoring_seconds"] / max(1e-9, out["training_seconds"]), 4)
    honest_d = [d for k, w in workers.items() if k != "bad" for d in w["distances"]]
    out["max_honest_replay_distance"] = max(honest_d) if honest_d else None
    # one replay's CPU time over one member-round's training time, and what the product's default draw costs
    per = (out["replay_seconds"] / max(1, out["replays"])) / max(1e-9, out["training_seconds"] / out["member_rounds"])
    out["replay_over_round"] = round(per, 3)
    out["replay_share"] = round(REPLAY_FRACTION * per, 5)
    return out


def run_one(args):
    config, text, rounds = args
    with tempfile.TemporaryDirectory(prefix="gptswarm-credit-") as records:
        row = {"name": name_of(config), **simulate(config, text, min(rounds, config.get("rounds", rounds)), records)}
    a = row.get("attacker")
    print(f"[credit] {row['name']}: honest flagged {row['honest_flagged']}, lowest honest standing "
          f"{row['min_honest_standing']}" + (f", attacker first flagged at its round {a['first_flag']}, credited "
                                             f"{a['credit_share']:.1%} of its claims" if a else "")
          + f", scoring {row['sample_share']:.1%} of the tokens, {row['time_share']:.1%} of the time; "
          f"{row['replays']} replays (honest failed {row['honest_replays_failed']}, largest honest distance "
          f"{row['max_honest_replay_distance']}), one replay {row['replay_over_round']}x a member's round"
          + (f", attacker's first failed replay at its round {a['first_replay_failed']}" if a else ""), flush=True)
    return row


def table(result):
    runs = result["runs"]
    clean = {r["name"]: r["val_loss"] for r in runs if not r["config"].get("attack")}
    lines = ["| configuration | honest flagged | lowest honest standing | honest credit (lowest) | attacker first "
             "flagged (its round): score / replay | attacker credit / claims | val loss (vs. without it) | "
             "scoring: tokens / time | replays: honest failed / largest honest distance / attacker's distances | "
             "replay at the default fraction: time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        a = r.get("attacker")
        last = max(r["val_loss"], key=int)
        loss = r["val_loss"][last]
        base = clean.get(r["name"].rsplit(" + ", 1)[0], {}).get(last) if a else None
        vs = f" ({(loss - base) / base:+.1%})" if base else ""
        dist = ", ".join(f"{d:.2f}" for d in a["replay_distances"]) if a else ""
        lines.append(f"| {r['name']} | {r['honest_flagged']} | {r['min_honest_standing']} | "
                     f"{r['honest_credit_share']:.0%} | {a['first_flag'] if a else ''}"
                     f"{' / ' + str(a['first_replay_failed']) if a else ''} | "
                     f"{format(a['credit_share'], '.1%') if a else ''} | {loss}{vs} | "
                     f"{r['sample_share']:.1%} / {r['time_share']:.1%} | {r['honest_replays_failed']} / "
                     f"{r['max_honest_replay_distance']} / {dist} | {r['replay_share']:.2%} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(prog="python -m bench.credit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--quick", action="store_true", help="two small rows, 12 rounds: check the harness")
    p.add_argument("--only", help="run only the rows whose name contains this")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default=str(HERE / "results" / "credit.json"))
    p.add_argument("--table", metavar="JSON", help="print a results file as a markdown table, and run nothing")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if not Path(args.text).is_file():
        sys.exit(f"Error: no such text file: {args.text} (pass --text)")
    text = Path(args.text).read_text(encoding="utf-8")
    configs = [c for c in configurations(args.quick) if not args.only or args.only in name_of(c)]
    rounds = 12 if args.quick else args.rounds
    t0 = time.time()
    configs.sort(key=lambda c: -c["workers"] * c["steps"] * c["block"] * (c.get("batch") or BATCH[c["block"]]))
    with get_context("spawn").Pool(args.jobs) as pool:  # the longest first, so that the pool ends together
        rows = pool.map(run_one, [(c, text, rounds) for c in configs], chunksize=1)
    rows.sort(key=lambda r: r["name"])
    result = {"rounds": rounds, "seconds": round(time.time() - t0), "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()

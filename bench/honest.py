"""Honest swarms across the configurations operators pick: does the robust rule leave out honest work?

Every configuration is a swarm of honest workers only: 2 or 4 of them (4: unequal speeds, 0.5x, 1x,
1x and 1.5x the inner steps), about 2 to 100 inner steps per round, blocks of 64 and 256, fp16,
8-bit and top-k. Each round runs what a real round runs, in one process so that the sweep fits a
2-core machine: every worker trains its inner steps with the product's Trainer from theta_global
(its own AdamW state and data, kept between rounds), computes its pseudo-gradient (top-k: with its
error feedback), which hivemind's TensorPartContainer splits into the parts the all-reduce would
send, each encoded and decoded with the run's codec; the coordinator's rule
(gptswarm/rounds/robust.py) reduces each part, the reply codec round-trips the average, and the
outer step moves theta_global. Only the network is left out.

Per configuration, over ROUNDS rounds: honest contributions flagged, members left out of any values,
parts left out per round, parts rescued (every member would have been left out), failed rounds,
validation loss every 10 rounds with the robust rule and with the plain weighted mean, and what
honest work looked like (the closest two members came, to their own previous contribution and to
the previous average; the lowest agreement in noise deviations; the largest norm ratio), which is
where the rule's thresholds come from. The mean's run is computed alongside (the same parts
averaged without the rule); where the rule's aggregate differs from the mean in any part, the
mean is also run on its own, and its losses are reported.

    python -m bench.honest --text ../shared/data/tinyshakespeare.txt [--quick] [--jobs 2]
"""

import argparse
import json
import math
import os
import sys
import time
from multiprocessing import get_context
from types import SimpleNamespace
from pathlib import Path

import torch

from bench.hostile_worker import ATTACKS

HERE = Path(__file__).resolve().parent
ROUNDS = 60
EVAL_EVERY = 10
STEPS = (2, 8, 32, 100)
WORKERS = (2, 4)
BLOCKS = {64: 8, 256: 2}  # block -> sequences per inner step (512 tokens either way: noisy, so hard for the rule)
CODECS = ("fp16", "8bit", "topk")
SPEEDS = {2: (1.0, 1.0), 3: (1.0, 1.0, 1.0), 4: (0.5, 1.0, 1.0, 1.5)}
HOSTILE = ("flip20", "scale100", "noise", "const", "replay")  # hostile_worker's attacks on what it sends (NaN
#                                                              and a claimed weight never reach the rule)  # each worker's inner steps, times the configuration's


def configurations(quick=False):
    if quick:
        return [dict(workers=w, steps=s, block=64, codec=c) for w, s, c in
                ((2, 2, "fp16"), (4, 8, "topk"), (4, 2, "8bit"))]
    out = [dict(workers=w, steps=s, block=b, codec=c) for b in BLOCKS for c in CODECS for w in WORKERS for s in STEPS]
    # the operator run: gpt-nano, block 256, the default batch of 64, about two inner steps each
    out.append(dict(workers=2, steps=2, block=256, codec="fp16", batch=64))
    return out


def attack_configurations():
    """The hostile rows beside the honest sweep: 3 honest workers and one attacker."""
    return [dict(workers=3, steps=s, block=64, codec=c, attack=a) for a in (None, *HOSTILE) for s in (4, 32)
            for c in ("fp16", "topk")]


def name_of(c):
    return (f"{c['workers']}w {c['steps']} steps block {c['block']} {c['codec']}"
            + (f" batch {c['batch']}" if c.get("batch") else "") + (f" + {c['attack']}" if c.get("attack") else ""))


class Honest:
    """Records what honest work looks like, from the rule's own measurements (robust.PartView)."""

    def __init__(self):
        self.peer_dist = self.own_dist = self.average_dist = self.agreement_z = math.inf
        self.norm_ratio = 0.0
        self.low = []  # (agreement / typical, agreement in noise deviations below typical) of members below COS_FLOOR

    def observe(self, view):
        if view.out and os.environ.get("HONEST_TRACE"):
            print(f"[trace] part {view.part_index} ({view.size}): out {view.out} rescued {view.rescued} "
                  f"agreement {[round(a, 3) for a in view.agreement.values()]} typical {view.typical} sigma "
                  f"{view.sigma} scaled/ref {[round(x / view.ref, 2) for x in view.scaled] if view.ref else None} "
                  f"peer {[round(d, 3) for *_, d in view.peer_dist]} own {view.own_dist} avg {view.average_dist}",
                  flush=True)
        for _, _, dist in view.peer_dist:
            self.peer_dist = min(self.peer_dist, dist)
        self.own_dist = min([self.own_dist, *view.own_dist.values()])
        self.average_dist = min([self.average_dist, *view.average_dist.values()])
        if view.typical is not None and view.sigma:
            self.agreement_z = min([self.agreement_z, *((a - view.typical) / view.sigma
                                                         for a in view.agreement.values())])
            self.low += [(round(a / view.typical, 3) if view.typical > 0 else None,
                          round((a - view.typical) / view.sigma, 2), round(view.typical, 3), view.size)
                         for a in view.agreement.values() if a < 0.1 and a < 0.5 * view.typical]
        if view.ref and len(view.scaled) >= 2:
            self.norm_ratio = max([self.norm_ratio, *(s / view.ref for s in view.scaled)])

    def figures(self):
        def r(x):
            return None if not math.isfinite(x) else round(x, 4)
        return {"peer_dist": r(self.peer_dist), "own_dist": r(self.own_dist), "average_dist": r(self.average_dist),
                "agreement_z": r(self.agreement_z), "norm_ratio": r(self.norm_ratio), "low": self.low[:50]}


def _data(text, block):
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(chars)


def _batch(ids, block, batch, gen):
    starts = torch.randint(len(ids) - block - 1, (batch,), generator=gen)
    x = torch.stack([ids[s:s + block] for s in starts])
    y = torch.stack([ids[s + 1:s + block + 1] for s in starts])
    return x, y


def simulate(config, text, rounds, aggregation, shadow=True):
    """One honest swarm of `config` for `rounds` rounds; the figures. config["attack"]: one more
    worker, "bad", runs this attack of bench/hostile_worker.py from the second round on."""
    from hivemind.averaging.partition import TensorPartContainer
    from hivemind.compression import CompressionInfo

    from gptswarm.mingpt_core.model import GPT, GPTConfig
    from gptswarm.mingpt_core.trainer import Trainer, TrainConfig, evaluate_loss
    from gptswarm.rounds import DEFAULT_TOPK, outer_defaults
    from gptswarm.rounds.codecs import ErrorFeedback, decode
    from gptswarm.rounds.hivemind_ext import CODECS as CODEC_PAIRS
    from gptswarm.rounds.hivemind_ext import ValidatingReducer
    from gptswarm.rounds.outer import outer_step, pseudo_gradient
    from gptswarm.rounds.robust import History, PartScores, RoundStats, aggregate_part
    from gptswarm.rounds.theta import theta_views

    torch.set_num_threads(1)
    block, codec_name, w = config["block"], config["codec"], config["workers"]
    batch = config.get("batch") or BLOCKS[block]
    train_ids, val_ids, vocab = _data(text, block)
    torch.manual_seed(1337)
    model_cfg = GPTConfig.from_preset("gpt-nano", vocab, block)
    global_model = GPT(model_cfg)
    theta = theta_views(global_model)
    momentum = {k: torch.zeros_like(v) for k, v in theta.items()}
    lr, mu = outer_defaults(codec_name)
    steps = [max(1, round(config["steps"] * f)) for f in SPEEDS[w]]
    attack = ATTACKS[config["attack"]] if config.get("attack") else None
    if attack is not None:
        steps.append(config["steps"])
    total_iters = rounds * sum(steps)  # a worker's schedule spans the swarm's budget, as in a real run
    workers = []
    for i in range(len(steps)):
        m = GPT(model_cfg)
        t = Trainer(m, TrainConfig(batch_size=batch, max_iters=total_iters, learning_rate=1e-3, min_lr=1e-4,
                                   warmup_iters=100))
        workers.append(dict(key=f"w{i}" if i < w else "bad", model=m, trainer=t, gen=torch.Generator().manual_seed(1000 + i),
                            feedback=ErrorFeedback(DEFAULT_TOPK) if codec_name == "topk" else None))
    send, reply = CODEC_PAIRS[codec_name](DEFAULT_TOPK)
    history = History(seed=0, roundtrip=lambda part: decode(reply.compress(part, CompressionInfo.from_tensor(part)),
                                                    part.numel()))
    honest = Honest()
    val_gen = torch.Generator().manual_seed(7)
    val = [_batch(val_ids, block, 32, val_gen) for _ in range(8)]
    names = list(theta)
    out = {"config": config, "aggregation": aggregation, "rounds": rounds, "flagged": 0, "members_left_out": 0,
           "parts_left_out": [], "parts_rescued": 0, "parts_lost": 0, "failed_rounds": 0, "differs_from_mean": 0,
           "val_loss": {}, "reasons": {}}
    t0 = time.time()
    for r in range(rounds):
        contributions = []
        for wk, n_steps in zip(workers, steps):
            wk["model"].load_state_dict(global_model.state_dict())
            for _ in range(n_steps):
                wk["trainer"].train_step(*_batch(train_ids, block, batch, wk["gen"]))
            grad = pseudo_gradient(theta, theta_views(wk["model"]))
            if wk["feedback"] is not None:
                grad = wk["feedback"].sparsify(grad)
            if wk["key"] == "bad":
                if r == 0:
                    continue  # it joins a running swarm
                grad, _ = attack(grad, 1, wk.get("last"))
                wk["last"] = {k: v.clone() for k, v in grad.items()}
            container = TensorPartContainer([grad[k] for k in names], peer_fractions=(1.0,), compression=send)
            parts = []
            for part in container.get_raw_input_parts(0):
                serialized = send.compress(part, CompressionInfo.from_tensor(part))
                parts.append(decode(serialized, part.numel()))
            contributions.append((wk["key"], n_steps * batch * block, parts))
        scores, stats = {}, RoundStats(observe=honest.observe)
        averaged, invalid = [], set()
        shapes = SimpleNamespace(num_parts=len(contributions[0][2]), part_shapes=[x.shape for x in contributions[0][2]],
                                 max_density=DEFAULT_TOPK if codec_name == "topk" else None)
        for p in range(len(contributions[0][2])):
            # the reducer's validation first (hivemind_ext.ValidatingReducer): a sender whose part cannot
            # be a pseudo-gradient (not finite, too large an entry, denser than the run's top-k) is out
            for k, t, parts in contributions:
                if k not in invalid and ValidatingReducer.reason_to_reject(shapes, p, parts[p], float(t)):
                    invalid.add(k)
            members = [c for c in contributions if c[0] not in invalid]
            keys = [k for k, _, _ in members]
            weights = [float(t) for _, t, _ in members]
            member_parts = [c[2][p] for c in members]
            mean = sum(wt / sum(weights) * x.float() for wt, x in zip(weights, member_parts))
            if aggregation == "robust":
                result = aggregate_part(p, member_parts, weights, keys, history, scores, stats)
                if shadow and not torch.equal(result, mean):
                    out["differs_from_mean"] += 1
            else:
                result = mean
                for k, x in zip(keys, member_parts):
                    s = scores.setdefault(k, PartScores())
                    s.parts, s.elements = s.parts + 1, s.elements + x.numel()
            serialized = reply.compress(result, CompressionInfo.from_tensor(result))
            averaged.append(decode(serialized, result.numel()).reshape(-1))
        history.end_round(scores)
        standing = [v for k, v in history.standing.items() if k != "bad"]
        if standing and r > 0:
            out["min_standing"] = round(min(standing + [out.get("min_standing", math.inf)]), 2)
        if "bad" in history.standing:
            out["bad_standing_max"] = round(max(history.standing["bad"], out.get("bad_standing_max", -math.inf)), 2)
        flagged = [k for k, s in scores.items() if s.flagged() or k in invalid] + [k for k in invalid if k not in scores]
        out_of_average = [k for k, s in scores.items() if s.flagged() or s.mostly_left_out()] + sorted(invalid)
        keys = [k for k, _, _ in contributions]
        out["bad_flagged"] = out.get("bad_flagged", 0) + ("bad" in flagged)
        flagged = [k for k in flagged if k != "bad"]
        out["flagged"] += len(flagged)
        out["members_left_out"] += sum(1 for k, s in scores.items() if s.left_out and k != "bad")
        out["parts_left_out"].append(stats.parts_left_out)
        out["parts_rescued"] += len(stats.rescued)
        out["parts_lost"] += stats.parts_lost
        for k, s in scores.items():
            for reason, n in s.reasons.items():
                reason = f"bad: {reason}" if k == "bad" else reason
                out["reasons"][reason] = out["reasons"].get(reason, 0) + n
        if len(out_of_average) == len(keys):
            out["failed_rounds"] += 1
        else:
            flat = torch.cat(averaged)
            avg, offset = {}, 0
            for k in names:
                avg[k] = flat[offset:offset + theta[k].numel()].view_as(theta[k])
                offset += theta[k].numel()
            outer_step(theta, momentum, avg, lr, mu)
            for wk in workers:
                if wk["feedback"] is not None and wk["key"] not in out_of_average:
                    wk["feedback"].commit()
        if (r + 1) % EVAL_EVERY == 0 or r + 1 == rounds:
            out["val_loss"][r + 1] = round(evaluate_loss(global_model, val), 4)
    out["honest"] = honest.figures() if aggregation == "robust" else None
    out["parts_left_out_per_round"] = round(sum(out["parts_left_out"]) / rounds, 3)
    out["parts_left_out_max"] = max(out.pop("parts_left_out"))
    out["parts"] = stats.parts
    out["seconds"] = round(time.time() - t0, 1)
    return out


def run_one(args):
    config, text, rounds = args
    robust = simulate(config, text, rounds, "robust")
    row = {"name": name_of(config), "robust": robust}
    if robust["differs_from_mean"]:
        row["mean"] = simulate(config, text, rounds, "mean")
    else:  # every part's aggregate was the mean's, bit for bit: the mean's run is this run
        row["mean"] = {"val_loss": robust["val_loss"], "same_run": True}
    gaps = [(robust["val_loss"][k] - row["mean"]["val_loss"][k]) / row["mean"]["val_loss"][k]
            for k in robust["val_loss"]]
    row["loss_gap_max"] = round(max(gaps, key=abs), 5)
    bad = f"attacker flagged in {robust['bad_flagged']} of {robust['rounds'] - 1} rounds, " if config.get("attack") else ""
    print(f"[honest] {row['name']}: {bad}flagged {robust['flagged']}, failed {robust['failed_rounds']}, "
          f"parts out/round {robust['parts_left_out_per_round']}, rescued {robust['parts_rescued']}, "
          f"loss {robust['val_loss'][rounds]} (mean {row['mean']['val_loss'][rounds]}), "
          f"{robust['seconds']} s", flush=True)
    return row


def summary(rows):
    honest = {}
    for key, pick in (("peer_dist", min), ("own_dist", min), ("average_dist", min), ("agreement_z", min),
                      ("norm_ratio", max)):
        values = [r["robust"]["honest"][key] for r in rows if r["robust"]["honest"][key] is not None]
        honest[key] = pick(values) if values else None
    return {"configurations": len(rows), "flagged": sum(r["robust"]["flagged"] for r in rows),
            "failed_rounds": sum(r["robust"]["failed_rounds"] for r in rows),
            "parts_lost": sum(r["robust"]["parts_lost"] for r in rows),
            "parts_rescued": sum(r["robust"]["parts_rescued"] for r in rows),
            "members_left_out": sum(r["robust"]["members_left_out"] for r in rows),
            "loss_gap_max": max((r["loss_gap_max"] for r in rows), key=abs), "honest": honest}


def table(result):
    """The sweep as a markdown table (bench/README.md)."""
    lines = ["| configuration | flagged | members left out | parts left out / round (max) | rescued | failed "
             "| val loss robust / mean at the last round | largest gap, any round |", "|---|---|---|---|---|---|---|---|"]
    for row in result["runs"]:
        rb, mean = row["robust"], row["mean"]
        last = str(result["rounds"]) if str(result["rounds"]) in rb["val_loss"] else result["rounds"]
        same = " (same run)" if mean.get("same_run") else ""
        lines.append(f"| {row['name']} | {rb['flagged']} | {rb['members_left_out']} | "
                     f"{rb['parts_left_out_per_round']} ({rb['parts_left_out_max']}) | {rb['parts_rescued']} | "
                     f"{rb['failed_rounds']} | {rb['val_loss'][last]} / {mean['val_loss'][last]}{same} | "
                     f"{row['loss_gap_max']:+.2%} |")
    return "\n".join(lines)


def attack_table(result):
    """The hostile rows as a markdown table: each attack beside the same swarm without it."""
    rounds = str(result["rounds"])
    clean = {r["name"]: r["robust"]["val_loss"] for r in result["runs"] if not r["robust"]["config"].get("attack")}
    lines = ["| configuration | attacker flagged | honest flagged | val loss, robust | against the clean run "
             "| the plain mean with the attacker |", "|---|---|---|---|---|---|"]
    for row in result["runs"]:
        rb = row["robust"]
        if not rb["config"].get("attack"):
            continue
        base = clean[row["name"].rsplit(" + ", 1)[0]][rounds]
        loss = rb["val_loss"][rounds]
        lines.append(f"| {row['name']} | {rb['bad_flagged']} of {rb['rounds'] - 1} rounds | {rb['flagged']} | {loss} | "
                     f"{(loss - base) / base:+.1%} | {row['mean']['val_loss'][rounds]} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(prog="python -m bench.honest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--quick", action="store_true", help="three small configurations, 12 rounds: check the harness")
    p.add_argument("--rounds", type=int, default=None, help=f"rounds per configuration (default {ROUNDS})")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="configurations run at once")
    p.add_argument("--only", help="run only configurations whose name contains this (e.g. '4w 2 steps')")
    p.add_argument("--attacks", action="store_true", help="the hostile rows instead: 3 honest workers and one "
                   "attacker of bench/hostile_worker.py, beside the same swarm without it")
    p.add_argument("--out", default=str(HERE / "results" / "honest.json"))
    p.add_argument("--table", metavar="JSON", help="print a results file as a markdown table, and run nothing")
    args = p.parse_args()
    if args.table:
        result = json.loads(Path(args.table).read_text())
        print((attack_table if any(r["robust"]["config"].get("attack") for r in result["runs"]) else table)(result))
        return
    if not Path(args.text).is_file():
        sys.exit(f"Error: no such text file: {args.text} (pass --text)")
    configs = [c for c in (attack_configurations() if args.attacks else configurations(args.quick))
               if not args.only or args.only in name_of(c)]
    result = sweep(Path(args.text).read_text(encoding="utf-8"), configs, args.rounds or (12 if args.quick else ROUNDS),
                   args.jobs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))


def sweep(text, configs, rounds, jobs):
    """Every configuration for `rounds` rounds, `jobs` at once: {rounds, seconds, summary, runs}."""
    # the longest first, so that the pool ends together
    configs = sorted(configs, key=lambda c: -c["workers"] * c["steps"] * c["block"] * (c.get("batch") or BLOCKS[c["block"]]))
    t0 = time.time()
    with get_context("spawn").Pool(jobs) as pool:
        rows = pool.map(run_one, [(c, text, rounds) for c in configs], chunksize=1)
    rows.sort(key=lambda r: r["name"])
    return {"rounds": rounds, "seconds": round(time.time() - t0), "summary": summary(rows), "runs": rows}


if __name__ == "__main__":
    main()

"""The synchronous baseline: torch DDP (gloo), 2 ranks, per-step fp32 gradient all-reduce, the
same model, data, schedule and global batch as a 2-worker swarm. Each rank runs on its own host
of a private network (bench/netns.py), so its bytes are counted at its network interface; --rate
shapes the links (tc tbf). With --target-loss, rank 0 checks the validation loss every
--check-every steps (the coordinator's check: the first 65,536 validation tokens; the clock is
stopped while it does) and both ranks stop once it is reached.

    sudo python -m bench.ddp --text ../shared/data/tinyshakespeare.txt [--iters 1000] \
        [--rate 20mbit --target-loss 2.4]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # where `python -m bench.<part>` finds the bench package
MODEL = dict(model="gpt-micro", block_size=64)
EVAL_TOKENS = 65536  # what the coordinator evaluates after every round


def rank_main(args):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gptswarm.mingpt_core import checkpoint, jobs
    from gptswarm.mingpt_core.data import Batches, eval_batches
    from gptswarm.mingpt_core.tasks import make_task
    from gptswarm.mingpt_core.trainer import Trainer, TrainConfig, evaluate_loss

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    cfg = TrainConfig(max_iters=args.iters, batch_size=args.batch, learning_rate=1e-3, min_lr=1e-4,
                      warmup_iters=100, eval_interval=args.iters)
    task = make_task(text=args.text, block_size=MODEL["block_size"])
    torch.manual_seed(cfg.seed)  # the same initial weights on both ranks (DDP also broadcasts them)
    model = jobs.build_model(task.tokenizer, task, MODEL["model"], MODEL["block_size"])
    shards = task.shard_set(65536, MODEL["block_size"])
    trainer = Trainer(model, cfg, "cpu")
    trainer.forward = DistributedDataParallel(model)
    batches = Batches(shards.split("train"), shards, MODEL["block_size"], cfg.batch_size, seed=cfg.seed + rank)
    t0, paused, reached = time.time(), 0.0, None
    while trainer.step < cfg.max_iters and reached is None:
        trainer.train_step(*batches.next())
        if args.target_loss and trainer.step % args.check_every == 0:
            p0 = time.time()
            stop = torch.zeros(1)
            if rank == 0:
                val = eval_batches(shards.split("val"), shards, MODEL["block_size"], 64, EVAL_TOKENS)
                loss = evaluate_loss(model, val)
                model.train()
                stop[0] = loss <= args.target_loss
            dist.broadcast(stop, 0)
            paused += time.time() - p0
            if stop.item():
                reached = {"step": trainer.step, "seconds": time.time() - t0 - paused}
    seconds = time.time() - t0 - paused
    if rank == 0:
        checkpoint.save(args.out, model, task.tokenizer, {**trainer.state_meta(), **task.meta()})
        Path(args.out, "ddp.json").write_text(json.dumps({"started_at": t0, "seconds": seconds, "steps": trainer.step,
                                                          "train_seconds": trainer.train_seconds, "reached": reached}))
    dist.barrier()
    dist.destroy_process_group()


def run(text, iters, out, batch=12, rate=None, target_loss=None, check_every=5):
    """Both ranks on their own hosts; the figures (loss, bytes per rank, wall seconds, and the time
    to the target loss)."""
    from bench.netns import Net

    from gptswarm.mingpt_core import jobs

    text, out = str(Path(text).resolve()), str(Path(out).resolve())
    with Net(2, rate=rate) as net:
        before = [net.tx_bytes(i) for i in range(2)]
        t0 = time.time()
        procs = []
        for r in range(2):
            env = {**os.environ, "MASTER_ADDR": net.addrs[0], "MASTER_PORT": "29533", "WORLD_SIZE": "2",
                   "RANK": str(r), "GLOO_SOCKET_IFNAME": net.dev, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "bench.ddp", "--text", text, "--iters", str(iters), "--batch", str(batch), "--out", out,
                   "--rank", str(r), "--check-every", str(check_every)]
            if target_loss:
                cmd += ["--target-loss", str(target_loss)]
            procs.append(subprocess.Popen(net.exec(r, cmd), env=env, cwd=REPO))
        codes = [q.wait() for q in procs]
        wall = time.time() - t0
        sent = [net.tx_bytes(i) - before[i] for i in range(2)]
    if any(codes):
        raise RuntimeError(f"a DDP rank failed: exit codes {codes}")
    info = json.loads(Path(out, "ddp.json").read_text())
    tokens = info["steps"] * batch * 2 * MODEL["block_size"]
    res = {"tokens": tokens, "wall_seconds": round(wall, 1), "steps": info["steps"], "bytes_sent_per_rank": sent,
           "bytes_per_mtok": round(sum(sent) / 2 / (tokens / 1e6)), "rate": rate}
    if target_loss:
        # from launching the ranks to the step that reached the target, the checks' time left out
        r = info["reached"]
        res["seconds_to_target"] = round(info["started_at"] - t0 + r["seconds"], 1) if r else None
        res["step_reached"] = r and r["step"]
    else:
        res["loss"] = jobs.evaluate(out, text=text, device="cpu")["val_loss"]
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--batch", type=int, default=12, help="sequences per rank per step")
    p.add_argument("--rate", help="shape each link with tc tbf, e.g. 20mbit")
    p.add_argument("--target-loss", type=float, help="stop when the validation loss reaches this")
    p.add_argument("--check-every", type=int, default=5, help="steps between validation checks (--target-loss)")
    p.add_argument("--out", default="runs/bench-ddp")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank is not None:
        return rank_main(args)
    print(json.dumps(run(args.text, args.iters, args.out, args.batch, args.rate, args.target_loss, args.check_every),
                     indent=1))


if __name__ == "__main__":
    main()

"""The synchronous baseline: torch DDP (gloo), 2 ranks, per-step fp32 gradient all-reduce, the
same model, data, schedule and global batch as a 2-worker swarm. Each rank runs in its own
network namespace (bench/netns.py), so its bytes are counted at its veth interface.

    sudo python bench/ddp.py --text ../shared/data/tinyshakespeare.txt [--iters 1000] [--rate 20mbit]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODEL = dict(model="gpt-micro", block_size=64)


def rank_main(args):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gptswarm.mingpt_core import checkpoint, jobs
    from gptswarm.mingpt_core.data import Batches
    from gptswarm.mingpt_core.tasks import make_task
    from gptswarm.mingpt_core.trainer import Trainer, TrainConfig

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
    t0 = time.time()
    while trainer.step < cfg.max_iters:
        trainer.train_step(*batches.next())
    seconds = time.time() - t0
    if rank == 0:
        checkpoint.save(args.out, model, task.tokenizer, {**trainer.state_meta(), **task.meta()})
        Path(args.out, "ddp.json").write_text(json.dumps({"seconds": seconds,
                                                          "train_seconds": trainer.train_seconds}))
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--batch", type=int, default=12, help="sequences per rank per step")
    p.add_argument("--rate", help="shape each link with tc tbf, e.g. 20mbit")
    p.add_argument("--out", default="runs/bench-ddp")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank is not None:
        return rank_main(args)

    from netns import ADDRS, Link

    from gptswarm.mingpt_core import jobs

    args.text = str(Path(args.text).resolve())
    args.out = str(Path(args.out).resolve())
    with Link(rate=args.rate) as link:
        before = [link.tx_bytes(i) for i in range(2)]
        t0 = time.time()
        procs = []
        for r in range(2):
            env = {**os.environ, "MASTER_ADDR": ADDRS[0], "MASTER_PORT": "29533", "WORLD_SIZE": "2", "RANK": str(r),
                   "GLOO_SOCKET_IFNAME": link.ifs[r], "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, __file__, "--text", args.text, "--iters", str(args.iters), "--batch",
                   str(args.batch), "--out", args.out, "--rank", str(r)]
            procs.append(subprocess.Popen(link.exec(r, cmd), env=env))
        codes = [q.wait() for q in procs]
        wall = time.time() - t0
        sent = [link.tx_bytes(i) - before[i] for i in range(2)]
    if any(codes):
        sys.exit(f"a DDP rank failed: exit codes {codes}")
    tokens = args.iters * args.batch * 2 * MODEL["block_size"]
    m = jobs.evaluate(args.out, text=args.text, device="cpu")
    print(json.dumps({"loss_ddp": m["val_loss"], "tokens": tokens, "wall_seconds": round(wall, 1),
                      "bytes_sent_per_rank": sent, "bytes_per_mtok_ddp": round(sum(sent) / 2 / (tokens / 1e6)),
                      "rate": args.rate}, indent=1))


if __name__ == "__main__":
    main()

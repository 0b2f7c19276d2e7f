"""The peer-to-peer baseline users would otherwise pick: hivemind's own collaborative
`hivemind.Optimizer`, 2 peers, configured as in hivemind's examples/albert: a target batch size
accumulated across peers, then an all-reduce of fp16-compressed gradients, the optimizer offloaded
with its step delayed (gradient averaging overlaps the next batches' compute), and fp16 state
averaging every epoch. Same model, data, token budget and AdamW schedule as the other runs; each
peer runs on its own host of a private network (bench/netns.py) so its bytes are counted at its
network interface. (albert uses LAMB and a 4096-sample target; here AdamW, as in every other run,
and a target of 192 sequences, 8x the others' global batch so that the per-epoch matchmaking does
not dominate, with the peak learning rate doubled for the larger batch.)

    sudo python -m bench.hivemind_opt --text ../shared/data/tinyshakespeare.txt [--tokens 1536000] \
        [--target-batch-size 192 --lr 2e-3]
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # where `python -m bench.<part>` finds the bench package
MODEL = dict(model="gpt-micro", block_size=64)
BATCH = 12  # sequences per local step, as every other run


def lr_factor(epoch, epochs, warmup, lr=1e-3, min_lr=1e-4):
    """The trainer's schedule (linear warmup, cosine to min_lr) in epochs, as a LambdaLR factor."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    t = min(1.0, (epoch - warmup) / max(1, epochs - warmup))
    return (min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (lr - min_lr)) / lr


def peer_main(args):
    import hivemind
    import torch
    from hivemind.compression import Float16Compression

    from gptswarm.mingpt_core import checkpoint, jobs
    from gptswarm.mingpt_core.data import Batches
    from gptswarm.mingpt_core.tasks import make_task

    torch.set_num_threads(1)
    rank, out = args.peer, Path(args.out)
    maddrs_file = out / "peer0.maddrs"
    if rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{args.host}/tcp/0"])
        maddrs_file.write_text("\n".join(str(m) for m in dht.get_visible_maddrs()))
    else:
        while not maddrs_file.exists():
            time.sleep(0.2)
        dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{args.host}/tcp/0"],
                           initial_peers=maddrs_file.read_text().split())
    task = make_task(text=args.text, block_size=MODEL["block_size"])
    torch.manual_seed(1337)
    model = jobs.build_model(task.tokenizer, task, MODEL["model"], MODEL["block_size"])
    shards = task.shard_set(65536, MODEL["block_size"])
    batches = Batches(shards.split("train"), shards, MODEL["block_size"], BATCH, seed=1337 + rank)
    epochs = args.tokens // (args.target_batch_size * MODEL["block_size"])
    warmup = max(1, round(100 * 24 / args.target_batch_size))  # the others' 100 steps of 24 sequences
    opt = hivemind.Optimizer(
        dht=dht, run_id="gsbench", target_batch_size=args.target_batch_size, batch_size_per_step=BATCH,
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95)), params=model.param_groups(0.1),
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: lr_factor(e, epochs, warmup, args.lr,
                                                                                      args.lr / 10)),
        matchmaking_time=args.matchmaking_time, averaging_timeout=30.0, offload_optimizer=True,
        delay_optimizer_step=True, delay_grad_averaging=True, grad_compression=Float16Compression(),
        state_averaging_compression=Float16Compression(), verbose=False)
    t0, compute = time.time(), 0.0
    while opt.local_epoch < epochs and time.time() - t0 < args.max_seconds:
        x, y = batches.next()
        c0 = time.perf_counter()
        model.train()
        _, loss = model(x, y)
        loss.backward()
        compute += time.perf_counter() - c0
        opt.step()
        opt.zero_grad()
    seconds = time.time() - t0
    if rank == 0:
        checkpoint.save(out / "model", model, task.tokenizer, {"iter": opt.local_epoch, **task.meta()})
    Path(out, f"peer{rank}.json").write_text(json.dumps({"seconds": seconds, "epochs": opt.local_epoch,
                                                        "forward_backward_seconds": compute}))
    time.sleep(3600)  # serve the other peer's last all-reduce; the harness ends both peers once both are done


def run(text, tokens, out, target_batch_size=192, lr=2e-3, matchmaking_time=2.0, max_seconds=600):
    from bench.netns import Net

    from gptswarm.mingpt_core import jobs

    text, out = str(Path(text).resolve()), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with Net(2) as net:
        before = [net.tx_bytes(i) for i in range(2)]
        t0 = time.time()
        procs = [subprocess.Popen(net.exec(i, [sys.executable, "-m", "bench.hivemind_opt", "--text", text, "--tokens", str(tokens),
                                               "--target-batch-size", str(target_batch_size), "--lr", str(lr),
                                               "--matchmaking-time", str(matchmaking_time), "--max-seconds",
                                               str(max_seconds), "--out", str(out), "--peer", str(i), "--host",
                                               net.addrs[i]]),
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                  stderr=open(out / f"peer{i}.log", "w"), start_new_session=True, cwd=REPO)
                 for i in range(2)]
        done = [out / f"peer{i}.json" for i in range(2)]
        while not all(f.exists() for f in done) and all(q.poll() is None for q in procs):
            time.sleep(0.2)
        wall = time.time() - t0
        sent = [net.tx_bytes(i) - before[i] for i in range(2)]
        codes = [q.poll() for q in procs]
        for q in procs:  # hivemind.Optimizer's shutdown waits out a pending averaging round: end the peers
            os.killpg(q.pid, signal.SIGKILL)
            q.wait()
    if not all(f.exists() for f in done):
        raise RuntimeError(f"a hivemind.Optimizer peer failed: exit codes {codes}; see {out}/peer*.log")
    info = [json.loads((out / f"peer{i}.json").read_text()) for i in range(2)]
    trained = info[0]["epochs"] * target_batch_size * MODEL["block_size"]
    return {"loss": jobs.evaluate(str(out / "model"), text=text, device="cpu")["val_loss"], "tokens": trained,
            "epochs": info[0]["epochs"], "target_batch_size": target_batch_size, "lr": lr, "wall_seconds": round(wall, 1),
            "stopped_at_max_seconds": trained < tokens,
            "bytes_sent_per_peer": sent, "bytes_per_mtok": round(sum(sent) / 2 / (trained / 1e6)),
            "compute_utilization": round(sum(i["forward_backward_seconds"] / i["seconds"] for i in info) / 2, 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--tokens", type=int, default=1_536_000)
    p.add_argument("--target-batch-size", type=int, default=192, help="sequences per collaborative step, all peers")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine to a tenth of it)")
    p.add_argument("--matchmaking-time", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=600, help="stop training after this long, whatever the epoch")
    p.add_argument("--out", default="runs/bench-hivemind-opt")
    p.add_argument("--peer", type=int, help=argparse.SUPPRESS)
    p.add_argument("--host", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer is not None:
        return peer_main(args)
    print(json.dumps(run(args.text, args.tokens, args.out, args.target_batch_size, args.lr, args.matchmaking_time,
                         args.max_seconds), indent=1))


if __name__ == "__main__":
    main()

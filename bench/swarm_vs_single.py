"""Swarm vs single process at the same token budget, character-level tinyshakespeare.

One `gptswarm train` process, and a coordinator with 2 workers, train the same model
(nanoGPT's CPU configuration: 4 layers, 4 heads, 128 wide, block 64) on the same number of tokens;
both checkpoints are then evaluated with `gptswarm eval --text` on the same validation split.
Also reports the bytes each worker sent per round for averaging (counted as the messages left the
process), against what fp32 per-step gradient all-reduce (DDP, ring, 2 ranks) would send for the
same tokens.

    python bench/swarm_vs_single.py --text ../shared/data/tinyshakespeare.txt [--tokens 1536000]
"""

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from gptswarm.coordinator.run import load_theta

EXE = str(Path(sys.executable).with_name("gptswarm"))
MODEL = ["--model", "gpt-micro", "--block-size", "64"]


def run(args, **kw):
    return subprocess.run([EXE, *map(str, args)], check=True, capture_output=True, text=True, **kw)


def evaluate(ckpt, text):
    return json.loads(run(["eval", ckpt, "--text", text, "--json", "--device", "cpu"]).stdout)


def run_swarm(text, tokens, sd, tokens_per_round=48_000, compression="fp16", outer_lr=0.7, outer_momentum=0.9,
              shard_tokens=4096, batch=12, workers=2):
    """A coordinator and `workers` workers on loopback train to the token budget; the figures."""
    t0 = time.time()
    coord = subprocess.Popen([EXE, *map(str, [
        "coordinator", "--text", text, *MODEL, "--state-dir", sd, "--listen", "127.0.0.1:0", "--dht-listen",
        "127.0.0.1:0", "--http", "127.0.0.1:0", "--token", "bench", "--batch-size", batch, "--lr", "1e-3",
        "--min-lr", "1e-4", "--warmup-iters", "100", "--tokens-per-round", tokens_per_round, "--max-tokens", tokens,
        "--compression", compression, "--outer-lr", outer_lr, "--outer-momentum", outer_momentum,
        "--matchmaking-time", "3", "--shard-tokens", shard_tokens])], stderr=subprocess.PIPE, text=True)
    join = None
    for line in coord.stderr:
        m = re.search(r"--join (\S+)", line)
        if m:
            join = m.group(1)
            break
    log = open(Path(sd) / "coordinator.log", "w")
    threading.Thread(target=lambda: [log.write(line) for line in coord.stderr], daemon=True).start()
    procs = [subprocess.Popen([EXE, "worker", "--join", join, "--token", "bench", "--name", f"w{i}", "--device", "cpu",
                               "--threads", "1", "--state-dir", str(Path(sd) / f"worker{i}")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(workers)]
    for w in procs:
        w.wait()  # workers leave when the run reaches its budget
    coord.terminate()
    coord.wait()
    out = {"swarm_seconds": round(time.time() - t0, 1),
           "loss_swarm": evaluate(Path(sd) / "checkpoints" / "latest", text)["val_loss"]}
    db = sqlite3.connect(Path(sd) / "ledger.sqlite")
    out["rounds"], out["tokens_swarm"] = db.execute("SELECT COUNT(*), SUM(tokens) FROM rounds WHERE state = 'done'").fetchone()
    out["bytes_sent_per_worker"] = [n for (n,) in db.execute("SELECT bytes_sent FROM workers ORDER BY name")]
    out["workers_joined"] = len(out["bytes_sent_per_worker"])
    out["history"] = db.execute("SELECT round, tokens, val_loss FROM rounds WHERE state = 'done' ORDER BY round").fetchall()
    out["params"] = load_theta(Path(sd) / "checkpoints" / "latest")[0].num_params(non_embedding=False)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--tokens", type=int, default=1_536_000, help="token budget of each run")
    p.add_argument("--tokens-per-round", type=int, default=96_000)
    p.add_argument("--compression", default="fp16", choices=["none", "fp16", "8bit"])
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--shard-tokens", type=int, default=4096, help="tokens per leased shard")
    p.add_argument("--skip-single", action="store_true", help="only run the swarm")
    p.add_argument("--workdir", default="runs/bench-swarm")
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    batch, block = 12, 64
    iters = args.tokens // (batch * block)
    out = {"tokens": args.tokens, "model": "gpt-micro (4L/4H/128, block 64)", "compression": args.compression,
           "tokens_per_round": args.tokens_per_round, "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum}

    t0 = time.time()
    if not args.skip_single:
        run(["train", "--text", args.text, *MODEL, "--batch-size", batch, "--max-iters", iters, "--lr", "1e-3",
             "--min-lr", "1e-4", "--warmup-iters", "100", "--eval-interval", iters, "--device", "cpu", "--quiet",
             "--out", work / "single"])
        out["single_seconds"] = round(time.time() - t0, 1)
        out["loss_single"] = evaluate(work / "single", args.text)["val_loss"]

    out.update(run_swarm(args.text, args.tokens, work / "swarm", args.tokens_per_round, args.compression,
                         args.outer_lr, args.outer_momentum, args.shard_tokens, batch))
    n_params = out["params"]
    # DDP, ring all-reduce over 2 ranks: each rank sends 2 * (n-1)/n * 4 bytes per parameter per step
    steps_per_worker = out["tokens_swarm"] / 2 / (batch * block)
    ddp_per_worker = steps_per_worker * 4 * n_params
    swarm_per_worker = sum(out["bytes_sent_per_worker"]) / len(out["bytes_sent_per_worker"])
    out["ddp_bytes_per_worker_same_tokens"] = round(ddp_per_worker)
    out["swarm_bytes_per_worker"] = round(swarm_per_worker)
    out["reduction_vs_ddp"] = round(ddp_per_worker / swarm_per_worker, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

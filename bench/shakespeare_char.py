"""Character-level tinyshakespeare with nanoGPT's CPU configuration (4 layers, 4 heads, 128 wide,
block 64, batch 12, 2000 iters, dropout 0, no biases, lr 1e-3 -> 1e-4, warmup 100, beta2 0.99).
Goal: validation loss <= 1.88, nanoGPT's published figure for this configuration.

    python -m bench.shakespeare_char --text ../shared/data/tinyshakespeare.txt
"""

import argparse
import json
import time

from gptswarm.mingpt_core import jobs
from gptswarm.mingpt_core.trainer import TrainConfig


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--out", default="runs/bench-shakespeare-char")
    p.add_argument("--max-iters", type=int, default=2000)
    args = p.parse_args()
    cfg = TrainConfig(max_iters=args.max_iters, batch_size=12, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                      beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=500)
    t0 = time.time()
    hist = jobs.train(args.out, text=args.text, model="gpt-micro", block_size=64, train_config=cfg, device="cpu",
                      overwrite=True, model_overrides=dict(dropout=0.0, bias=False))
    wall = time.time() - t0
    last = hist[-1]
    print(json.dumps({"val_loss": last["val_loss"], "goal": 1.88, "goal_met": last["val_loss"] <= 1.88,
                      "wall_seconds": round(wall, 1), "train_tokens_per_second": last["tokens_per_second"],
                      "tokens": last["tokens"]}))


if __name__ == "__main__":
    main()

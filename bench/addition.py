"""Addition benchmark: a small GPT must reach >= 99.9% exact match on held-out 2-digit sums
(minGPT's adder reached 999/1000).

    python -m bench.addition [--out runs/bench-addition]
"""

import argparse
import json
import time

from gptswarm.mingpt_core import jobs
from gptswarm.mingpt_core.trainer import TrainConfig


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-addition")
    p.add_argument("--model", default="gpt-nano")
    p.add_argument("--max-iters", type=int, default=4000)
    args = p.parse_args()
    cfg = TrainConfig(max_iters=args.max_iters, batch_size=64, learning_rate=2e-3, min_lr=1e-4, warmup_iters=100,
                      weight_decay=0.1, beta2=0.99, eval_interval=1000)
    t0 = time.time()
    jobs.train(args.out, task="addition", model=args.model, train_config=cfg, device="cpu", overwrite=True)
    minutes = (time.time() - t0) / 60
    m = jobs.evaluate(args.out, task="addition", device="cpu")
    result = {"model": args.model, "max_iters": args.max_iters, "correct": m["correct"], "total": m["total"],
              "accuracy": m["accuracy"], "cpu_minutes": round(minutes, 2), "goal": 0.999,
              "goal_met": m["accuracy"] >= 0.999}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

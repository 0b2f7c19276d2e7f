"""A hostile volunteer, for the attack tests and the robustness benchmark: the real `gptswarm
worker` (the product's Worker: its heartbeats, leases and averaging) whose contribution is tampered
with before it leaves. Nothing in the product knows about it.

    GPTSWARM_TOKEN=T python -m bench.hostile_worker --attack flip20 --join HOST:PORT --tls-fingerprint sha256:... \
        --name mallory --state-dir D

Attacks (each on the pseudo-gradient g it computed honestly, of norm |g|):
  flip20    -20 g                      scale100  100 g
  noise     Gaussian noise of norm |g| const     a constant vector of norm |g| (every entry equal)
  replay    what it sent the round before (its first honest g, again and again)
  nan       NaN everywhere             heavy     g, but claiming a weight of a billion tokens
Attacks on the credit (each claims every token of its leases, as an honest worker would):
  lazy      g / 10 (as if it trained a tenth of its steps)   partial   g / 2 (half of its shard)
  freeride  zeros                      offdata   g of training on other data (its shards' text reversed)
"""

import argparse
import os
from pathlib import Path

import torch

from gptswarm.logs import setup_logging
from gptswarm.worker.cli import run
from gptswarm.worker.config import WorkerConfig
from gptswarm.worker.loop import Worker


def _norm(g):
    return torch.sqrt(sum((v.float() ** 2).sum() for v in g.values()))


def _filled(g, fill):
    n = sum(v.numel() for v in g.values())
    return {k: fill(v, n) for k, v in g.items()}


ATTACKS = {
    "flip20": lambda g, w, last: ({k: -20 * v for k, v in g.items()}, w),
    "scale100": lambda g, w, last: ({k: 100 * v for k, v in g.items()}, w),
    "noise": lambda g, w, last: (_filled(g, lambda v, n: torch.randn_like(v) * _norm(g) / n ** 0.5), w),
    "const": lambda g, w, last: (_filled(g, lambda v, n: torch.full_like(v, float(_norm(g) / n ** 0.5))), w),
    "replay": lambda g, w, last: (last if last is not None else g, w),
    "nan": lambda g, w, last: ({k: torch.full_like(v, float("nan")) for k, v in g.items()}, w),
    "heavy": lambda g, w, last: (g, 1e9),
    "lazy": lambda g, w, last: ({k: v / 10 for k, v in g.items()}, w),
    "partial": lambda g, w, last: ({k: v / 2 for k, v in g.items()}, w),
    "freeride": lambda g, w, last: ({k: torch.zeros_like(v) for k, v in g.items()}, w),
    "offdata": lambda g, w, last: (g, w),  # what it trained on is the attack (OffData)
}


class OffData:
    """Batches of a leased shard's text reversed: another text over the same vocabulary."""

    def __init__(self, batches):
        self.batches = batches
        self.tokens_per_batch = batches.tokens_per_batch
        self.generator = batches.generator  # what its record says it drew from: the leased shard's

    def next(self):
        x, y = self.batches.next()
        rows = torch.cat([x, y[:, -1:]], dim=1).flip(1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class HostileWorker(Worker):
    def __init__(self, config, attack):
        super().__init__(config)
        self.attack = ATTACKS[attack]
        self.off_data = attack == "offdata"
        self.last = None  # what it sent the round before

    def _train_step(self):
        if self.off_data:
            with self.shared.lock:
                shard = self.shared.shard
                if shard is not None and not isinstance(shard.batches, OffData):
                    shard.batches = OffData(shard.batches)
        super()._train_step()

    def contribution(self, grad, weight, round_):
        grad, weight = self.attack(grad, weight, self.last)
        self.last = {k: v.clone() for k, v in grad.items()}
        return grad, weight


def main():
    p = argparse.ArgumentParser(prog="python -m bench.hostile_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack", choices=sorted(ATTACKS), required=True)
    for opt in ("--join", "--name", "--state-dir"):
        p.add_argument(opt, required=True)
    p.add_argument("--tls-fingerprint", default="")
    p.add_argument("--plaintext", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    setup_logging(json_logs=True)
    torch.set_num_threads(args.threads)
    config = WorkerConfig(join=args.join, token=os.environ.get("GPTSWARM_TOKEN", ""), name=args.name, device="cpu",
                          state_dir=Path(args.state_dir), tls_fingerprint=args.tls_fingerprint,
                          plaintext=args.plaintext)
    run(HostileWorker(config, args.attack))


if __name__ == "__main__":
    main()

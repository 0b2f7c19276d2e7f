"""A hostile volunteer for the tests: the real `gptswarm worker` (the product's Worker, its
heartbeats, leases and averaging) whose contribution is tampered with before it reaches the
average. Nothing in the product knows about it.

    python tests/hostile_worker.py --attack nan --join HOST:PORT --token T --name mallory --state-dir D
"""

import argparse
from pathlib import Path

import torch

from gptswarm.logs import setup_logging
from gptswarm.worker.cli import run
from gptswarm.worker.config import WorkerConfig
from gptswarm.worker.loop import Worker


def nan(grad, weight, round_):
    return {k: torch.full_like(v, float("nan")) for k, v in grad.items()}, weight


def heavy(grad, weight, round_):
    """An honest update that claims to weigh a billion tokens."""
    return grad, 1e9


ATTACKS = {"nan": nan, "heavy": heavy}


class HostileWorker(Worker):
    def __init__(self, config, attack):
        super().__init__(config)
        self.attack = ATTACKS[attack]

    def contribution(self, grad, weight, round_):
        return self.attack(grad, weight, round_)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attack", choices=sorted(ATTACKS), required=True)
    for opt in ("--join", "--token", "--name", "--state-dir"):
        p.add_argument(opt, required=True)
    args = p.parse_args()
    setup_logging()
    torch.set_num_threads(1)
    config = WorkerConfig(join=args.join, token=args.token, name=args.name, device="cpu", state_dir=Path(args.state_dir))
    run(HostileWorker(config, args.attack))


if __name__ == "__main__":
    main()

"""The memory plan (gptswarm/mingpt_core/plan.py) against the memory a CPU actually uses.

Each row trains two steps of a preset with the product's Trainer (fp32 on the CPU, as a CPU worker
does) in a fresh process, and compares the process's peak resident memory beyond what it held before
the model existed (torch imported, nothing allocated) with the plan's training-device total for the
same model, batch, optimizer and checkpointing (4-byte activations). A GPU's measurement (peak
allocated memory under each --max-vram cap, and tokens/s against an uncapped loop) is for
bench/gpu.py when a device is lent.

    python -m bench.plan_memory [--out bench/results/plan_memory.json]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = [  # (preset, vocabulary, block, batch, optimizer, checkpointing)
    ("gpt-mini", 65, 256, 16, "adamw", False),
    ("gopher-44m", 50257, 256, 8, "adamw", False),
    ("gopher-44m", 50257, 256, 8, "adamw8bit", False),
    ("gopher-44m", 50257, 256, 8, "adamw", True),
    ("gpt3-small", 50257, 256, 4, "adamw", False),
    ("gpt3-small", 50257, 256, 4, "adamw8bit", True),
    ("gpt2", 50257, 512, 4, "adamw", False),
]


def measure(preset, vocab, block, batch, optimizer, checkpointing):
    """In this (fresh) process: the peak resident bytes two training steps add."""
    import resource

    import psutil
    import torch

    from gptswarm.mingpt_core.model import GPT, GPTConfig
    from gptswarm.mingpt_core.trainer import TrainConfig, Trainer

    torch.set_num_threads(2)
    base = psutil.Process().memory_info().rss
    model = GPT(GPTConfig.from_preset(preset, vocab, block))
    trainer = Trainer(model, TrainConfig(batch_size=batch, optimizer=optimizer, checkpointing=checkpointing,
                                         dtype="float32", max_iters=10))
    x = torch.randint(vocab, (batch, block))
    for _ in range(2):
        trainer.train_step(x, x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def main():
    p = argparse.ArgumentParser(prog="python -m bench.plan_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "results" / "plan_memory.json"))
    p.add_argument("--row", type=int, help=argparse.SUPPRESS)  # one row, in the child process
    args = p.parse_args()
    if args.row is not None:
        print(json.dumps(measure(*ROWS[args.row])))
        return
    from gptswarm.mingpt_core.model import GPTConfig
    from gptswarm.mingpt_core.plan import GIB, SLACK, make

    rows = []
    for i, (preset, vocab, block, batch, optimizer, ckpt) in enumerate(ROWS):
        out = subprocess.run([sys.executable, "-m", "bench.plan_memory", "--row", str(i)], capture_output=True,
                             text=True, check=True, cwd=HERE.parent)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        plan = make(GPTConfig.from_preset(preset, vocab, block), batch_size=batch, micro=batch, optimizer=optimizer,
                    checkpointing=ckpt, value_bytes=4, cap=None, fused=False)
        row = {"preset": preset, "vocab": vocab, "block": block, "batch": batch, "optimizer": optimizer,
               "checkpointing": ckpt, "n_params": plan.n_params,
               "plan_parts_gib": {k: round(v / GIB, 3) for k, v in plan.device.items()},
               "plan_gib": round(plan.device_total / GIB, 3), "plan_without_slack_gib":
               round(plan.device_total / SLACK / GIB, 3), "measured_gib": round(measured / GIB, 3)}
        row["measured_over_plan"] = round(measured / plan.device_total, 3)
        rows.append(row)
        print(f"[plan_memory] {preset} block {block} batch {batch} {optimizer}{' checkpointing' if ckpt else ''}: "
              f"plan {row['plan_gib']} GiB, measured {row['measured_gib']} GiB ({row['measured_over_plan']:.2f}x)",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": "cpu (fp32)", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

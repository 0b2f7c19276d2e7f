"""GPU throughput: one gptswarm worker's training step (the Trainer every worker runs: AdamW,
clipping, bf16 autocast, torch.compile) against a plain PyTorch training loop of the same model, in
the same run, on the same GPU. Tokens/s and MFU (6N + attention FLOPs per token, against the
card's dense bf16 peak). Random tokens: this measures compute, not data. Under 5 minutes on one
H100 for gpt2 (124M).

    python -m bench.gpu [--model gpt2 --block-size 1024 --batch-size 16 --steps 50] [--out bench/results/gpu.json]
    python -m bench.gpu --device cpu --model gpt-nano --block-size 64 --batch-size 8 --steps 5 --no-compile   # smoke
"""

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.mingpt_core.trainer import Trainer, TrainConfig, peak_flops


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batches, warmup, steps, device):
    for x, y in batches[:warmup]:
        step(x, y)
    sync(device)
    t0 = time.perf_counter()
    for x, y in batches[warmup:warmup + steps]:
        step(x, y)
    sync(device)
    return time.perf_counter() - t0


def plain_loop(cfg, args, device, dtype):
    """What a PyTorch user writes: compiled model, fused AdamW, autocast, clip, step."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    fwd = torch.compile(model) if args.compile else model
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(x, y):
        with amp:
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker_trainer(cfg, args, device, dtype):
    torch.manual_seed(0)
    trainer = Trainer(GPT(cfg), TrainConfig(max_iters=10**6, batch_size=args.batch_size, learning_rate=6e-4,
                                            dtype=str(dtype).replace("torch.", ""), compile=args.compile), device)
    return lambda x, y: trainer.train_step(x, y).item()  # a worker reads each step's loss, as here


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="model preset (gpt2 = 124M)")
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50304, help="GPT-2's 50257 padded to a multiple of 64")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=50, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--out", default="bench/results/gpu.json")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = GPTConfig.from_preset(args.model, args.vocab_size, args.block_size)
    g = torch.Generator().manual_seed(0)
    n = args.warmup + args.steps
    data = torch.randint(0, args.vocab_size, (n, args.batch_size, args.block_size + 1), generator=g).to(device)
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    tokens = args.steps * args.batch_size * args.block_size
    flops_per_token = GPT(cfg).flops_per_token()
    peak = peak_flops(device) if device.type == "cuda" else None
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
           "params": GPT(cfg).num_params(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or "cpu", "dtype": args.dtype, "compile": args.compile,
           "batch": [args.batch_size, args.block_size], "steps": args.steps, "torch": torch.__version__}
    for name, make in (("plain_pytorch", plain_loop), ("gptswarm_worker", worker_trainer)):
        seconds = timed(make(cfg, args, device, dtype), batches, args.warmup, args.steps, device)
        tps = tokens / seconds
        out[name] = {"tokens_per_second": round(tps), "mfu": round(flops_per_token * tps / peak, 4) if peak else None}
        if device.type == "cuda":
            out[name]["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        print(name, out[name], flush=True)
    out["worker_vs_plain"] = round(out["gptswarm_worker"]["tokens_per_second"] / out["plain_pytorch"]["tokens_per_second"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

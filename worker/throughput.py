"""How fast this machine trains the run's model: measured once on a throwaway copy of the model,
with the micro-batch that fits its memory, and cached per (model, batch, device, dtype) in the
worker's state directory so that a restart does not measure again."""

import hashlib
import json
import logging
import platform
import time
from pathlib import Path

import torch

from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.mingpt_core.trainer import TrainConfig, Trainer, resolve_dtype

log = logging.getLogger("gptswarm.worker")
CACHE = "benchmarks.json"
STEPS = 3  # timed steps, after one warm-up step


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure(model_config: GPTConfig, train: TrainConfig, device: torch.device, state_dir: Path) -> tuple[float, int]:
    """(tokens per second, micro-batch size) of a training step of `train.batch_size` sequences."""
    dtype = str(resolve_dtype(device, train.dtype)).replace("torch.", "")
    key = hashlib.sha256(json.dumps([model_config.to_dict(), train.batch_size, describe_device(device), dtype],
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache = state_dir / CACHE
    try:
        known = json.loads(cache.read_text())
    except (FileNotFoundError, ValueError):
        known = {}
    if key in known:
        b = known[key]
        log.info("throughput %s tokens/s on %s (%s, micro-batch %d; measured earlier)",
                 f"{b['tokens_per_second']:,.0f}", describe_device(device), dtype, b["micro_batch_size"])
        return b["tokens_per_second"], b["micro_batch_size"]
    trial = Trainer(GPT(model_config), TrainConfig(**{**train.to_dict(), "max_iters": 10**9}), device)
    x = torch.randint(0, model_config.vocab_size, (train.batch_size, model_config.block_size))
    trial.train_step(x, x)  # warm-up (and the micro-batch search, if memory is short)
    t0 = time.perf_counter()
    for _ in range(STEPS):
        trial.train_step(x, x).item()
    tps = STEPS * x.numel() / (time.perf_counter() - t0)
    micro = trial.cfg.micro_batch_size or train.batch_size
    del trial
    if device.type == "cuda":
        torch.cuda.empty_cache()
    known[key] = {"tokens_per_second": round(tps, 1), "micro_batch_size": micro, "device": describe_device(device),
                  "dtype": dtype, "measured_at": time.time()}
    cache.write_text(json.dumps(known, indent=1))
    log.info("throughput %s tokens/s on %s (%s, micro-batch %d)", f"{tps:,.0f}", describe_device(device), dtype, micro)
    return tps, micro

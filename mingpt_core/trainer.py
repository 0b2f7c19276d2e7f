"""The one trainer: `gptswarm train` runs it end to end, and the swarm worker runs its
train_step() as the inner loop of each round.

AdamW (decay on >= 2-D weights), linear warmup then cosine decay to min_lr, gradient clipping,
optional micro-batching, and a precision policy: bf16 autocast on GPUs that support it, fp16 with
a GradScaler on older GPUs, fp32 on CPU.
"""

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, fields

import torch
from tqdm import tqdm

from gptswarm.errors import UserError
from gptswarm.mingpt_core.optim8bit import AdamW8bit

log = logging.getLogger("gptswarm.trainer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTIMIZERS = ("adamw", "adamw8bit")

# dense bf16/fp16 tensor-core peak FLOP/s, for the MFU estimate
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


@dataclass
class TrainConfig:
    max_iters: int = 2000
    batch_size: int = 12
    micro_batch_size: int = 0  # 0: the whole batch at once; else accumulate gradients over slices
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: decay over max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0: off
    eval_interval: int = 250
    eval_tokens: int = 1 << 20  # validation tokens per evaluation, at most
    seed: int = 1337
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    optimizer: str = "adamw"  # adamw | adamw8bit (its moments in 8 bits, blockwise: optim8bit.py)
    checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}; choose auto, {', '.join(DTYPES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose {' or '.join(OPTIMIZERS)}")
        for name in ("max_iters", "batch_size", "eval_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def resolve_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but no CUDA GPU is available")
    return device


def limit_vram(device, max_gib):
    """Cap this process's share of a GPU's memory (--max-vram); allocations beyond it raise
    OutOfMemoryError, which the trainer answers with a smaller micro-batch."""
    if device.type != "cuda" or not max_gib:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_gib * 2**30 / total), device)


def resolve_dtype(device, requested="auto"):
    if requested != "auto":
        return DTYPES[requested]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


@torch.no_grad()
def evaluate_loss(model, batches, device="cpu", autocast=contextlib.nullcontext):
    """Mean loss over (x, y) batches, weighted by the number of unmasked targets."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            _, loss = model(x, y)
        n = int((y != -1).sum())
        total += loss.item() * n
        count += n
    return total / max(count, 1)


class Trainer:
    def __init__(self, model, cfg, device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.dtype = resolve_dtype(self.device, cfg.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        if cfg.optimizer == "adamw8bit":
            self.optimizer = AdamW8bit(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate,
                                       betas=(cfg.beta1, cfg.beta2))
        else:
            self.optimizer = model.optimizer(cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        model.checkpointing = cfg.checkpointing
        self.forward = torch.compile(model) if cfg.compile else model
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0  # wall time spent inside train_step

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def lr(self, it):
        """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
        c = self.cfg
        decay_iters = c.lr_decay_iters or c.max_iters
        if it < c.warmup_iters:
            return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
        if it >= decay_iters:
            return c.min_lr
        ratio = (it - c.warmup_iters) / max(1, decay_iters - c.warmup_iters)
        return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)

    def train_step(self, x, y):
        """One optimizer step on batch (x, y); returns the loss as a 0-d tensor (no device sync).
        Out of GPU memory, it halves the micro-batch (accumulating gradients over more slices, the
        same step mathematically) and tries again, down to one sequence at a time."""
        t0 = time.perf_counter()
        while True:
            try:
                loss = self._step(x, y)
                break
            except torch.OutOfMemoryError:
                micro = self.cfg.micro_batch_size or len(x)
                self.optimizer.zero_grad(set_to_none=True)
                if micro <= 1:
                    raise
                self.cfg.micro_batch_size = micro // 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of GPU memory at micro-batch %d: retrying with %d", micro, micro // 2)
        self.step += 1
        self.tokens += x.numel()
        self.train_seconds += time.perf_counter() - t0
        return loss

    def _step(self, x, y):
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr(self.step)
        self.model.train()
        micro = self.cfg.micro_batch_size or len(x)
        total = torch.zeros((), device=self.device)
        for xs, ys in zip(x.split(micro), y.split(micro)):
            xs = xs.to(self.device, non_blocking=True)
            ys = ys.to(self.device, non_blocking=True)
            with self.autocast():
                _, loss = self.forward(xs, ys)
            loss = loss * (len(xs) / len(x))
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def evaluate(self, batches):
        return evaluate_loss(self.model, batches, self.device, self.autocast)

    def mfu(self, tokens_per_second):
        peak = peak_flops(self.device)
        if peak is None:
            return None
        return self.model.flops_per_token() * tokens_per_second / peak

    # --- exact resume: optimizer, grad scaler and RNG states travel in optimizer.safetensors ---

    def state_tensors(self, batches):
        t = {}
        for i, st in self.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                t[f"optim.{i}.{k}"] = v.detach().cpu() if torch.is_tensor(v) else torch.tensor(v)
        t["rng.torch"] = torch.get_rng_state()
        t["rng.batches"] = batches.generator.get_state()
        if self.device.type == "cuda":
            t["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return t

    def state_meta(self):
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]
        return {"step": self.step, "tokens_trained": self.tokens, "train": self.cfg.to_dict(),
                "optim_groups": groups, "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def load_state(self, tensors, meta, batches):
        self.step = int(meta.get("step", 0))
        self.tokens = int(meta.get("tokens_trained", 0))
        if tensors is None:
            return
        sd = self.optimizer.state_dict()
        state = {}
        for name, v in tensors.items():
            if name.startswith("optim."):
                _, i, k = name.split(".", 2)
                state.setdefault(int(i), {})[k] = v
        for g, saved in zip(sd["param_groups"], meta.get("optim_groups", [])):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        batches.generator.set_state(tensors["rng.batches"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if meta.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(meta["scaler"])


def fit(trainer, batches, evaluate=None, save=None, progress=True):
    """Train until cfg.max_iters. Every eval_interval steps and at the end, evaluate() returns a
    dict of metrics and save(metrics) writes a checkpoint. Returns the list of evaluations."""
    cfg = trainer.cfg
    history = []
    bar = tqdm(total=cfg.max_iters, initial=trainer.step, disable=not progress, unit="it",
               dynamic_ncols=True, mininterval=0.5)
    tokens0, seconds0 = trainer.tokens, trainer.train_seconds
    while trainer.step < cfg.max_iters:
        loss = trainer.train_step(*batches.next())
        bar.update(1)
        last = trainer.step == cfg.max_iters
        if trainer.step % 10 == 0 or last:
            tps = (trainer.tokens - tokens0) / max(trainer.train_seconds - seconds0, 1e-9)
            post = {"loss": f"{loss.item():.4f}", "tok/s": f"{tps:,.0f}"}
            mfu = trainer.mfu(tps)
            if mfu is not None:
                post["mfu"] = f"{mfu:.0%}"
            bar.set_postfix(post, refresh=False)
        if trainer.step % cfg.eval_interval == 0 or last:
            metrics = {"step": trainer.step, "tokens": trainer.tokens, "train_loss": round(loss.item(), 4)}
            if evaluate is not None:
                metrics.update(evaluate())
            metrics["tokens_per_second"] = round((trainer.tokens - tokens0) / max(trainer.train_seconds - seconds0, 1e-9))
            history.append(metrics)
            bar.write("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
            if save is not None:
                save(metrics)
    bar.close()
    return history

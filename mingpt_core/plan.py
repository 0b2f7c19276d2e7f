"""What training a model takes in memory, part by part, and how a worker fits it under a cap
(`gptswarm plan`, and the worker's join check: worker/bootstrap.py).

On the training device: the weights and their gradients (fp32: the precision policy autocasts the
matmuls, never the weights), AdamW's two moments (fp32, 8 bytes a parameter; or 8 bits each,
blockwise: optim8bit.py, about 2), and the activations of one micro-batch, which backward needs:
per token and layer about ACT_PER_LAYER x n_embd values (Korthikanti et al. 2022's 34 bytes at 2
bytes a value; scaled_dot_product_attention's kernels keep no score matrix, the gpt3 band being a
mask), and the logits (the vocabulary's width, three times: the logits, their fp32 copy for the
loss, its gradient). The optimizer's step has a workspace of its own (workspace()). With
activation checkpointing only each block's input is kept, and one block's activations live during
its recomputation. Values are 2 bytes under bf16/fp16 autocast, 4 in fp32. SLACK covers the
allocator's fragmentation and the kernels' workspaces.

On the host: theta_global and the outer momentum (fp32), the copy of theta_local taken at each
exchange, a checkpoint being downloaded, the top-k residual, and the record of the round for
replays (its start: AdamW's state and, with steps trained ahead, theta).

fit() tries, in this order, what costs the least throughput first: the whole batch at once, then
smaller micro-batches (down to an eighth of the batch), then 8-bit optimizer state, then activation
checkpointing, then micro-batches down to one sequence. The formulas are checked against the
memory a CPU actually uses (bench/plan_memory.py, bench/README.md "Memory").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptswarm.mingpt_core.model import GPT, PRESETS, GPTConfig
from gptswarm.mingpt_core.optim8bit import BLOCK, CHUNK

GIB = 1 << 30
ACT_PER_LAYER = 17  # values saved per token and layer for backward, times n_embd
SLACK = 1.1  # the allocator's fragmentation and the kernels' workspaces
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8 / BLOCK}  # a parameter's moments
WORKSPACE_VALUES = 6  # 4-byte temporaries per value of an AdamW8bit slice in its step


def count_params(config: GPTConfig) -> int:
    """The model's parameter count, without allocating it (on the meta device)."""
    with torch.device("meta"):
        return GPT(config).num_params(non_embedding=False)


@dataclass(frozen=True)
class Plan:
    """A way to train `config` with batches of `batch_size` sequences: the device's parts and the
    host's, in bytes; fits: the device's total is within the cap (None: no cap)."""
    config: GPTConfig
    n_params: int
    batch_size: int
    micro_batch: int
    optimizer: str
    checkpointing: bool
    value_bytes: int  # of an activation
    device: dict[str, int]
    host: dict[str, int]
    cap: int | None

    @property
    def device_total(self) -> int:
        """The peak: the activations are freed by the backward pass before the optimizer's step allocates
        its workspace, so only the larger of the two counts."""
        d = self.device
        return int((sum(d.values()) - min(d["activations"], d["optimizer workspace"])) * SLACK)

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def fits(self) -> bool:
        return self.cap is None or self.device_total <= self.cap

    def lines(self) -> list[str]:
        """The plan as a volunteer reads it."""
        out = [f"{self.n_params / 1e6:,.1f}M parameters; batch {self.batch_size} x {self.config.block_size} tokens, "
               f"micro-batch {self.micro_batch}, {self.optimizer}, activation checkpointing "
               f"{'on' if self.checkpointing else 'off'}, activations in {self.value_bytes}-byte values",
               "training device:"]
        out += [f"  {name:<24} {b / GIB:8.2f} GiB" for name, b in self.device.items()]
        out.append(f"  {'peak (x' + format(SLACK, 'g') + ' slack)':<24} {self.device_total / GIB:8.2f} GiB"
                   + (f" of the {self.cap / GIB:.1f} GiB cap: {'fits' if self.fits else 'DOES NOT FIT'}"
                      if self.cap is not None else ""))
        out.append("host memory:")
        out += [f"  {name:<24} {b / GIB:8.2f} GiB" for name, b in self.host.items()]
        out.append(f"  {'total':<24} {self.host_total / GIB:8.2f} GiB")
        return out


def activations(config: GPTConfig, micro: int, value_bytes: int, checkpointing: bool) -> int:
    """Bytes of activations backward needs for a micro-batch of `micro` sequences."""
    T, C, L = config.block_size, config.n_embd, config.n_layer
    per_layer = ACT_PER_LAYER * C  # values a token (the attention kernels keep no score matrix, banded or not)
    logits = 3 * config.vocab_size * 4  # bytes a token: the logits, their fp32 copy, its gradient (fp32 bound)
    layers = L * C + per_layer if checkpointing else L * per_layer  # checkpointing: each block's input, and one
    #                                                                  block's activations while it is recomputed
    return micro * T * (layers * value_bytes + logits)


def workspace(config: GPTConfig, n: int, optimizer: str, fused: bool) -> int:
    """Bytes the optimizer's step allocates for a while: AdamW8bit's decoded slice (its moments, codes and
    denominator, about WORKSPACE_VALUES values each, optim8bit.CHUNK at most); AdamW's foreach step (a
    CPU's) a denominator for every parameter; its fused kernel (a GPU's) none."""
    if optimizer == "adamw8bit":
        largest = max(config.vocab_size * config.n_embd, 4 * config.n_embd * config.n_embd)
        return WORKSPACE_VALUES * 4 * min(largest, CHUNK)
    return 0 if fused else 4 * n


def make(config: GPTConfig, *, batch_size: int, micro: int, optimizer: str, checkpointing: bool,
         value_bytes: int, cap: int | None, topk: bool = False, n_params: int | None = None,
         fused: bool = True) -> Plan:
    """The plan of one way to train config (fused: the GPU's fused AdamW, else a CPU's foreach step)."""
    n = n_params if n_params is not None else count_params(config)
    device = {"weights": 4 * n, "gradients": 4 * n, "optimizer state": int(OPTIMIZER_BYTES[optimizer] * n),
              "optimizer workspace": workspace(config, n, optimizer, fused),
              "activations": activations(config, micro, value_bytes, checkpointing)}
    host = {"theta_global": 4 * n, "outer momentum": 4 * n, "theta_local at exchange": 4 * n,
            "checkpoint download": 4 * n, "replay record": int((OPTIMIZER_BYTES[optimizer] + 4) * n)}
    if topk:
        host["top-k residual"] = 4 * n
    return Plan(config, n, batch_size, micro, optimizer, checkpointing, value_bytes, device, host, cap)


def fit(config: GPTConfig, *, batch_size: int, cap: int | None, value_bytes: int = 2, topk: bool = False,
        lean: bool = True, fused: bool = True) -> Plan:
    """The first way to train config within `cap` bytes of device memory (see the module's docstring);
    the leanest one, not fitting, if none does. lean False: AdamW and no checkpointing only."""
    n = count_params(config)
    halvings = []
    m = batch_size
    while m >= 1:
        halvings.append(m)
        m //= 2
    large = [m for m in halvings if m * 8 >= batch_size]
    small = [m for m in halvings if m * 8 < batch_size]
    tries = [("adamw", False, m) for m in large]
    if lean:
        tries += [("adamw8bit", False, m) for m in large] + [("adamw8bit", True, m) for m in halvings]
    else:
        tries += [("adamw", False, m) for m in small]
    plan = None
    for optimizer, ckpt, micro in tries:
        plan = make(config, batch_size=batch_size, micro=micro, optimizer=optimizer, checkpointing=ckpt,
                    value_bytes=value_bytes, cap=cap, topk=topk, n_params=n, fused=fused)
        if plan.fits:
            return plan
    assert plan is not None
    return plan


def largest_preset(*, vocab_size: int, block_size: int, batch_size: int, cap: int, value_bytes: int = 2,
                   topk: bool = False) -> str | None:
    """The largest preset model that fit() fits within cap (None: not even the smallest)."""
    best, size = None, -1
    for name in PRESETS:
        config = GPTConfig.from_preset(name, vocab_size, block_size)
        plan = fit(config, batch_size=batch_size, cap=cap, value_bytes=value_bytes, topk=topk)
        if plan.fits and plan.n_params > size:
            best, size = name, plan.n_params
    return best

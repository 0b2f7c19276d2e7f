"""What the coordinator tells a worker to train, checked before anything is built from it: the
model and training configs within sane bounds, and a model that fits this machine's memory (a
clear error otherwise, never an out-of-memory crash hours later). The same bounds size what the
worker will accept as the run's checkpoint files (download.py)."""

import json
import math
from dataclasses import dataclass, fields

import psutil
import torch

from gptswarm.errors import UserError
from gptswarm.mingpt_core.data import ShardSet
from gptswarm.mingpt_core.model import PRESETS, GPTConfig
from gptswarm.mingpt_core.plan import GIB, Plan, fit, largest_preset
from gptswarm.mingpt_core.trainer import TrainConfig, resolve_dtype
from gptswarm.proto import gptswarm_pb2 as pb
from gptswarm.rounds import COMPRESSIONS

# far above any model a volunteer could train, far below what would hang or exhaust the worker
LIMITS = {"n_layer": 1024, "n_head": 1024, "n_embd": 65536, "vocab_size": 1 << 16, "block_size": 1 << 17,
          "attn_window": 1 << 17}
TRAIN_LIMITS = {"batch_size": 1 << 16, "micro_batch_size": 1 << 16, "warmup_iters": 1 << 40,
                "lr_decay_iters": 1 << 40, "eval_interval": 1 << 40, "eval_tokens": 1 << 40}
SHARD_KEYS = ("vocab_size", "layout", "example_len", "loss_start", "piece_tokens")
SHARD_LIMITS = {"vocab_size": 1 << 16, "example_len": 1 << 17, "loss_start": 1 << 17, "piece_tokens": 1 << 40}
TEXT_FILE_LIMIT = 64 << 20  # config.json, tokenizer.json
HEADER_SLACK = 1 << 20  # a safetensors file's header, beyond its tensors


@dataclass(frozen=True)
class RunSpec:
    model: GPTConfig
    train: TrainConfig
    shard_info: ShardSet  # the run's shard layout (no shards)
    n_params: int
    plan: Plan  # how this machine trains it: micro-batch, optimizer, checkpointing (mingpt_core/plan.py)

    def file_limit(self, name: str) -> int | None:
        """The most bytes the run's checkpoint file `name` may have (None: not a file of the format)."""
        tensors = 4 * self.n_params + HEADER_SLACK
        return {"model.safetensors": tensors, "optimizer.safetensors": tensors, "config.json": TEXT_FILE_LIMIT,
                "tokenizer.json": TEXT_FILE_LIMIT}.get(name)


def _json(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"the coordinator sent a {what} that is not a JSON object")
    return value


def _bounded(values: dict, limits: dict[str, int], what: str) -> None:
    for key, high in limits.items():
        v = values.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= high:
            raise UserError(f"the coordinator's {what} has {key} = {str(v)[:40]}, outside 0..{high}")
    for key, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"the coordinator's {what} has {key} = {v}")


def _typed(values: dict, cls: type, what: str) -> None:
    """Each known field of the dataclass cls has the JSON type of its declared type."""
    for f in fields(cls):
        if f.name not in values:
            continue
        v, kind = values[f.name], f.type if isinstance(f.type, type) else type(f.default)
        ok = {bool: isinstance(v, bool), int: isinstance(v, int) and not isinstance(v, bool),
              float: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              str: isinstance(v, str) and len(v) <= 64}.get(kind, True)
        if not ok:
            raise UserError(f"the coordinator's {what} has {f.name} = {str(v)[:40]!r}, not a {kind.__name__}")


def memory_available(device: torch.device) -> tuple[int, int | None]:
    """(bytes of host memory available, bytes free on the training device or None for the CPU)."""
    host = psutil.virtual_memory().available
    if device.type == "cuda":
        return host, torch.cuda.mem_get_info(device)[0]
    return host, None


def parse(cfg: pb.RunConfig, device: torch.device, max_vram: float = 0.0) -> RunSpec:
    """The RunSpec of a RunConfig; UserError if it is out of bounds or does not fit this machine (the
    GPU's free memory, or max_vram GiB of it if less; the host's available memory), saying the
    largest preset that would."""
    model_dict, train_dict = _json(cfg.model_config_json, "model config"), _json(cfg.train_config_json,
                                                                                   "training config")
    shard_dict = _json(cfg.shards_json, "shard layout")
    _typed(model_dict, GPTConfig, "model config")
    _typed(train_dict, TrainConfig, "training config")
    _bounded(model_dict, LIMITS, "model config")
    _bounded(train_dict, TRAIN_LIMITS, "training config")
    _bounded(shard_dict, SHARD_LIMITS, "shard layout")
    try:
        model = GPTConfig.from_dict(model_dict)
        train = TrainConfig.from_dict(train_dict)
        shard_info = ShardSet([], **{k: shard_dict[k] for k in SHARD_KEYS if k in shard_dict})
    except (TypeError, ValueError) as e:
        raise UserError(f"the coordinator sent a run config this worker cannot use: {str(e)[:200]}") from None
    if cfg.compression not in COMPRESSIONS:
        raise UserError(f"the coordinator's run uses compression {cfg.compression[:40]!r}, which this worker does not "
                        f"know ({', '.join(COMPRESSIONS)}): install the coordinator's gptswarm version")
    if cfg.compression == "topk" and not 0 < cfg.topk_fraction <= 1:
        raise UserError(f"the coordinator's run has top-k fraction {cfg.topk_fraction}, outside (0, 1]")
    if model.vocab_size > LIMITS["vocab_size"]:
        raise UserError(f"the run's vocabulary ({model.vocab_size}) does not fit its uint16 shards")
    host, free = memory_available(device)
    if free is not None and max_vram:
        free = min(free, int(max_vram * GIB))
    value_bytes = 4 if resolve_dtype(device, train.dtype) == torch.float32 else 2
    topk = cfg.compression == "topk"
    batch = train.batch_size
    plan = fit(model, batch_size=batch, cap=free, value_bytes=value_bytes, topk=topk, lean=free is not None,
               fused=device.type == "cuda")
    need_host = plan.host_total + (plan.device_total if free is None else 0)  # a CPU trains in host memory
    if plan.fits and need_host <= host:
        return RunSpec(model, train, shard_info, plan.n_params, plan)
    if not plan.fits:
        assert free is not None
        best = largest_preset(vocab_size=model.vocab_size, block_size=model.block_size, batch_size=batch, cap=free,
                              value_bytes=value_bytes, topk=topk)
        need, have, where = plan.device_total, free, f"{device}" + (" under --max-vram" if max_vram else "")
    else:
        best = _largest_on_host(model, batch, host, device_too=free is None, value_bytes=value_bytes, topk=topk)
        need, have, where = need_host, host, "this machine's memory"
    how = ("even one sequence at a time with 8-bit optimizer state and activation checkpointing" if free is not None
           else "as it trains here")
    raise UserError(f"the run's model ({plan.n_params:,} parameters) needs about {need / GIB:.1f} GiB of {where} "
                    f"{how}, more than the {have / GIB:.1f} GiB free: it cannot train here (the largest preset that "
                    f"could: {best or 'none'}; `gptswarm plan --model NAME --vram GIB` tells what each needs)")


def _largest_on_host(model: GPTConfig, batch: int, host: int, *, device_too: bool, value_bytes: int,
                     topk: bool) -> str | None:
    """The largest preset (at this run's vocabulary and context) whose host memory (and, on a CPU, its
    training memory) fits in `host` bytes."""
    best, size = None, -1
    for name in PRESETS:
        p = fit(GPTConfig.from_preset(name, model.vocab_size, model.block_size), batch_size=batch, cap=None,
                value_bytes=value_bytes, topk=topk, lean=False)
        if p.host_total + (p.device_total if device_too else 0) <= host and p.n_params > size:
            best, size = name, p.n_params
    return best

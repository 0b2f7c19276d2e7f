"""The one checkpoint format, used by `gptswarm train --out`, the coordinator and the worker.

A checkpoint is a directory:
  model.safetensors      model weights (the tied LM head is stored once, as the token embedding)
  config.json            {"format", "model": GPTConfig, "meta": {step, tokens_trained, created_at, ...}}
  tokenizer.json         the tokenizer (`tokenizers` format)
  optimizer.safetensors  optional: optimizer state and RNG states, for exact resume
Nothing is pickled. Directories are written beside the target and renamed into place, so a crash
never leaves a half-written checkpoint.
"""

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptswarm.errors import UserError
from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.mingpt_core.tokenizer import Tokenizer

FORMAT = "gptswarm-checkpoint/1"
TIED = "lm_head.weight"  # same tensor as transformer.wte.weight


def model_tensors(model):
    """The model's weights by name, without the tied duplicate, contiguous, on CPU."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k != TIED}


def is_checkpoint(path):
    return (Path(path) / "config.json").is_file()


def save(directory, model, tokenizer, meta, extra_tensors=None):
    """Write a checkpoint atomically. meta is merged with created_at; extra_tensors (optimizer and
    RNG state) go to optimizer.safetensors."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir()
    try:
        save_file(model_tensors(model), str(tmp / "model.safetensors"))
        meta = dict(meta, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        cfg = {"format": FORMAT, "model": model.config.to_dict(), "meta": meta}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        tokenizer.save(tmp / "tokenizer.json")
        if extra_tensors:
            save_file({k: v.contiguous() for k, v in extra_tensors.items()}, str(tmp / "optimizer.safetensors"))
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src, dst):
    """Move directory src to dst, replacing dst if it exists (the old one is removed last)."""
    dst = Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_config(directory):
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such checkpoint directory")
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{directory} is not a gptswarm checkpoint (no config.json)") from None
    except ValueError as e:
        raise UserError(f"{directory}/config.json is corrupt: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise UserError(f"{directory}/config.json is not a {FORMAT} file")
    return cfg


def load_tensors(path, what):
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{what}: {path.name} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{what}: {path.name} is corrupt ({str(e).splitlines()[0]})") from None


def load(directory, device="cpu"):
    """(model, tokenizer, meta) from a checkpoint directory, or a UserError saying what is wrong."""
    directory = Path(directory)
    cfg = read_config(directory)
    try:
        config = GPTConfig.from_dict(cfg["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{directory}/config.json has no valid model config ({e})") from None
    tokenizer = Tokenizer.load(directory / "tokenizer.json")
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                        f"{config.vocab_size}")
    model = GPT(config)
    load_weights(model, load_tensors(directory / "model.safetensors", str(directory)), str(directory))
    return model.to(device), tokenizer, cfg.get("meta", {})


def load_weights(model, tensors, what):
    """Copy {name: tensor} into model, refusing missing, unexpected or misshapen tensors."""
    expected = {k: v for k, v in model.state_dict().items() if k != TIED}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{what} does not match its model config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise UserError(f"{what} does not match its model config: {k} has shape {tuple(v.shape)}, "
                            f"expected {tuple(expected[k].shape)}")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k])


def load_extra(directory):
    """The optimizer/RNG tensors of a checkpoint, or None if it has none."""
    path = Path(directory) / "optimizer.safetensors"
    return load_tensors(path, str(directory)) if path.exists() else None

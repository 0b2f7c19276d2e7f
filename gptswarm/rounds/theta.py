"""theta_global on disk and in memory, the same on the coordinator and every worker.

A swarm checkpoint is the one checkpoint format (mingpt_core/checkpoint.py) holding theta_global
after a round, with the outer optimizer's momentum in optimizer.safetensors
(`outer.momentum.<name>`) and the round and tokens_trained in its metadata. Each committed round
has its directory, checkpoints/round-NNNNNN, and checkpoints/latest links to the newest one.
theta_hash() is what workers compare with the coordinator's after every round.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from gptswarm.mingpt_core import checkpoint

KEEP_ROUNDS = 3  # the newest round directories are all kept (and older ones at exponential spacing)
MOMENTUM = "outer.momentum."


def theta_views(model):
    """{name: tensor} sharing storage with the model's weights (the tied head appears once)."""
    return {k: v for k, v in model.state_dict().items() if k != checkpoint.TIED}


def theta_hash(tensors):
    """sha256 over names, dtypes, shapes and bytes of a {name: tensor} dict, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def round_dir(state_dir, round_):
    return Path(state_dir) / "checkpoints" / f"round-{round_:06d}"


def latest_dir(state_dir):
    """checkpoints/latest: a link to the newest committed round's directory."""
    return Path(state_dir) / "checkpoints" / "latest"


def save_round(state_dir, model, tokenizer, settings, *, round_, tokens_trained, momentum, extra_meta=None):
    """Write theta_global(round_) to checkpoints/round-NNNNNN (atomically); `latest` is not touched
    (point_latest does that once the round is committed)."""
    meta = {"round": round_, "tokens_trained": tokens_trained, "step": round_, "run_id": settings.run_id,
            **settings.task, "swarm": {"outer_lr": settings.outer_lr, "outer_momentum": settings.outer_momentum,
                                       "compression": settings.compression}, **(extra_meta or {})}
    extra = {MOMENTUM + k: v for k, v in momentum.items()}
    checkpoint.save(round_dir(state_dir, round_), model, tokenizer, meta, extra)


def set_checkpoint_meta(state_dir, round_, **values):
    """Add values to the meta of round round_'s checkpoint (its config.json, replaced atomically), if
    it is still kept."""
    path = round_dir(state_dir, round_) / "config.json"
    try:
        cfg = json.loads(path.read_text())
        cfg["meta"].update(values)
        tmp = path.with_name(f".config.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cfg, indent=1))
        os.replace(tmp, path)
    except FileNotFoundError:  # no longer kept (point_latest dropped it meanwhile)
        return


def kept(rounds, current):
    """The round directories worth keeping: the current one, the last KEEP_ROUNDS, round 0 and every
    power of two (exponentially spaced: a run of a million rounds keeps about twenty), the rounds
    an operator can roll back to."""
    rounds = sorted(rounds)
    return {current, *rounds[-KEEP_ROUNDS:], *(r for r in rounds if r & (r - 1) == 0)}


def kept_rounds(state_dir):
    """The round numbers with a checkpoint directory."""
    return sorted(int(d.name.split("-")[1]) for d in (Path(state_dir) / "checkpoints").glob("round-*"))


def point_latest(state_dir, round_):
    """Make checkpoints/latest point at round round_'s directory, atomically (a link renamed over the
    old one), then drop the round directories not worth keeping (kept())."""
    latest = latest_dir(state_dir)
    tmp = latest.with_name(f".latest-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(round_dir(state_dir, round_).name)
    if latest.is_dir() and not latest.is_symlink():  # a state dir from before rounds had directories
        shutil.rmtree(latest)
    os.replace(tmp, latest)
    rounds = kept_rounds(state_dir)
    for r in set(rounds) - kept(rounds, round_):
        shutil.rmtree(round_dir(state_dir, r), ignore_errors=True)


def load_theta(directory):
    """(model, tokenizer, meta, momentum) from a swarm checkpoint directory."""
    model, tokenizer, meta = checkpoint.load(directory, "cpu")
    extra = checkpoint.load_extra(directory) or {}
    momentum = {k[len(MOMENTUM):]: v for k, v in extra.items() if k.startswith(MOMENTUM)}
    tensors = checkpoint.model_tensors(model)
    if set(momentum) != set(tensors):
        momentum = {k: torch.zeros_like(v) for k, v in tensors.items()}
    return model, tokenizer, meta, momentum

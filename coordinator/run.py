"""A swarm run on disk: everything the coordinator needs to start or resume lives in --state-dir.

  run.json            run id, model and inner-training config, round settings, token budget
  token               the swarm token (mode 0600; workers need it to join)
  tokenizer.json
  shards/             training and validation shards + manifest.json (sha256-named)
  ledger.sqlite       workers, shards, leases, rounds, contributions, events (WAL)
  checkpoints/latest  theta_global after the last finished round, in the checkpoint format of
                      `gptswarm train` (+ outer momentum in optimizer.safetensors)
  checkpoints/round-NNNNNN  a few older rounds
"""

import hashlib
import json
import os
import secrets
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gptswarm.errors import UserError
from gptswarm.mingpt_core import checkpoint
from gptswarm.mingpt_core.data import ShardSet, read_text
from gptswarm.mingpt_core.model import GPT, GPTConfig
from gptswarm.mingpt_core.tasks import make_task
from gptswarm.mingpt_core.trainer import TrainConfig

COMPRESSIONS = ("none", "fp16", "8bit")
KEEP_ROUNDS = 3


@dataclass
class RunSettings:
    run_id: str
    task: dict
    model: dict
    train: dict
    tokens_per_round: int = 100_000
    max_tokens: int = 10_000_000
    compression: str = "fp16"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    shard_tokens: int = 16384
    extra: dict = field(default_factory=dict)

    def save(self, path):
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        return cls(**json.loads(Path(path).read_text()))


def new_run(state_dir, task=None, text=None, digits=2, tokenizer_kind="char", vocab_size=None, model="gpt-nano",
            block_size=None, model_overrides=None, train_config=None, tokens_per_round=100_000, max_tokens=10_000_000,
            compression="fp16", outer_lr=0.7, outer_momentum=0.9, shard_tokens=16384, seed=1337):
    """Prepare a new run in state_dir: shards, tokenizer, run.json and theta_global(0).
    Everything is validated before the directory is created."""
    state_dir = Path(state_dir)
    if compression not in COMPRESSIONS:
        raise UserError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    if tokens_per_round < 1 or max_tokens < 1:
        raise UserError("--tokens-per-round and --max-tokens must be positive")
    t = make_task(task, text, digits, None, tokenizer_kind, vocab_size, block_size)
    bs = block_size or t.block_size
    t.check_block_size(bs)
    config = GPTConfig.from_preset(model, t.tokenizer.vocab_size, bs, **(model_overrides or {}))
    shards = t.shard_set(shard_tokens, bs)
    cfg = train_config or TrainConfig()
    state_dir.mkdir(parents=True, exist_ok=True)
    shards.write(state_dir / "shards")
    t.tokenizer.save(state_dir / "tokenizer.json")
    settings = RunSettings(uuid.uuid4().hex[:12], t.meta(), config.to_dict(), cfg.to_dict(), tokens_per_round,
                           max_tokens, compression, outer_lr, outer_momentum, shard_tokens, {"preset": model})
    torch.manual_seed(seed)
    theta = GPT(config)
    save_theta(state_dir, theta, t.tokenizer, settings, round_=0, tokens_trained=0,
               momentum={k: torch.zeros_like(v) for k, v in checkpoint.model_tensors(theta).items()})
    settings.save(state_dir / "run.json")  # last: a state dir with run.json is complete
    return settings


def check_resume(settings, state_dir, task=None, text=None, model=None):
    """Refuse flags that contradict the run stored in state_dir (they only shape a new run)."""
    stored = settings.task.get("task")
    asked = "addition" if task else "text" if text else None
    if asked and asked != stored:
        raise UserError(f"{state_dir} holds a run on task {stored!r}; use another --state-dir for a new run")
    if text and read_text_sha256(text) != settings.task.get("text_sha256"):
        raise UserError(f"{text} is not the text the run in {state_dir} was created with")
    if model and model != settings.extra.get("preset"):
        raise UserError(f"the run in {state_dir} uses model {settings.extra.get('preset')!r}, not {model!r}")


def read_text_sha256(path):
    return hashlib.sha256(read_text(path).encode()).hexdigest()


def load_run(state_dir):
    state_dir = Path(state_dir)
    try:
        return RunSettings.load(state_dir / "run.json")
    except FileNotFoundError:
        raise UserError(f"{state_dir} holds no run (no run.json)") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{state_dir}/run.json is corrupt: {e}") from None


def swarm_token(state_dir, token=None):
    """The swarm token: the one given (saved, so a restart keeps it), else the saved one, else new."""
    path = Path(state_dir) / "token"
    if token:
        path.write_text(token)
    elif path.exists():
        token = path.read_text().strip()
    else:
        token = secrets.token_urlsafe(16)
        path.write_text(token)
    os.chmod(path, 0o600)
    return token


def save_theta(state_dir, model, tokenizer, settings, round_, tokens_trained, momentum, extra_meta=None):
    """Write checkpoints/latest for theta_global(round_) and keep a copy of the last few rounds."""
    ckdir = Path(state_dir) / "checkpoints"
    meta = {"round": round_, "tokens_trained": tokens_trained, "step": round_, "run_id": settings.run_id,
            **settings.task, "swarm": {"outer_lr": settings.outer_lr, "outer_momentum": settings.outer_momentum,
                                       "compression": settings.compression}, **(extra_meta or {})}
    extra = {f"outer.momentum.{k}": v for k, v in momentum.items()}
    checkpoint.save(ckdir / "latest", model, tokenizer, meta, extra)
    keep = ckdir / f"round-{round_:06d}"
    if not keep.exists():
        tmp = ckdir / f".round-{round_:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ckdir / "latest", tmp)
        os.replace(tmp, keep)
    for old in sorted(ckdir.glob("round-*"))[:-KEEP_ROUNDS]:
        shutil.rmtree(old, ignore_errors=True)


def load_theta(directory):
    """(model, tokenizer, meta, momentum) from a swarm checkpoint directory."""
    model, tokenizer, meta = checkpoint.load(directory, "cpu")
    extra = checkpoint.load_extra(directory) or {}
    prefix = "outer.momentum."
    momentum = {k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)}
    tensors = checkpoint.model_tensors(model)
    if set(momentum) != set(tensors):
        momentum = {k: torch.zeros_like(v) for k, v in tensors.items()}
    return model, tokenizer, meta, momentum


def read_shards(state_dir):
    return ShardSet.read(Path(state_dir) / "shards")


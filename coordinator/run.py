"""A swarm run on disk: everything the coordinator needs to start or resume lives in --state-dir.

  run.json            run id, model and inner-training config, round settings, token budget
  token               the swarm token (mode 0600; workers need it to join)
  tokenizer.json
  shards/             training and validation shards + manifest.json (sha256-named)
  ledger.sqlite       workers, shards, leases, rounds, contributions, events (WAL)
  checkpoints/round-NNNNNN  theta_global after round NNNNNN, in the checkpoint format of
                      `gptswarm train` (+ outer momentum in optimizer.safetensors); the last few
  checkpoints/latest  a link to the newest one
  p2p_identity.key    the coordinator's hivemind identity (workers dial its peer id)
"""

import hashlib
import json
import os
import secrets
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
from gptswarm.private import private_dir, write_private
from gptswarm.rounds import AGGREGATIONS, COMPRESSIONS, DEFAULT_TOPK, outer_defaults
from gptswarm.rounds.theta import point_latest, save_round

DEFAULT_PRESET = "gpt-nano"
# the workers' inner training, unless the operator says otherwise (TrainConfig's own defaults are
# for one machine; a swarm round wants bigger batches)
SWARM_TRAIN = TrainConfig(batch_size=64)
# inner steps per worker per round that a round lasts at least (0: rounds end on tokens alone). DiLoCo
# works at tens to hundreds (H = 500 in the paper); the committed benchmark trains about 31 per round
# within 2% of DDP's loss; bench/honest.py measures the robust rule from 2 to 100 (bench/README.md)
INNER_STEPS = 32


@dataclass
class RunSettings:
    """run.json: what a run trains and how its rounds go. The defaults here are the CLI's."""
    run_id: str
    task: dict  # the task's metadata (mingpt_core/tasks.py)
    model: dict  # GPTConfig
    train: dict  # the workers' inner TrainConfig
    tokens_per_round: int = 100_000  # a round ends when the swarm trained this many tokens in it...
    round_growth: float = 1.0  # ... times up to this factor as the run progresses (round_target) ...
    inner_steps: int = INNER_STEPS  # ... or, if more, this many inner steps for each worker training in it
    max_tokens: int = 10_000_000  # the run's token budget
    compression: str = "fp16"  # how pseudo-gradients travel (COMPRESSIONS)
    topk_fraction: float = DEFAULT_TOPK  # "topk": the fraction of values a contribution sends
    aggregation: str = "robust"  # how the coordinator reduces them (AGGREGATIONS)
    outer_lr: float = None  # outer Nesterov SGD (None: rounds.outer_defaults for the compression)
    outer_momentum: float = None
    shard_tokens: int = 16384  # tokens per leased shard
    extra: dict = field(default_factory=dict)  # {"preset": model preset name}

    def round_target(self, tokens_trained, *, workers=0, step_tokens=0):
        """The tokens that end a round when the run has trained tokens_trained: tokens_per_round at
        the start, growing linearly with the run's progress to round_growth times it at the end
        (short rounds while the loss falls fast, longer ones, so fewer bytes, as it flattens); or,
        if more, enough for each of the `workers` training in the round to take inner_steps steps
        of step_tokens tokens (a growing swarm must not shrink every worker's share of a round to
        a step or two: bench/README.md, "Honest swarms")."""
        progress = min(1.0, tokens_trained / self.max_tokens)
        by_tokens = int(self.tokens_per_round * (1 + (self.round_growth - 1) * progress))
        return max(by_tokens, self.inner_steps * step_tokens * workers)

    def save(self, path):
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        return cls(**json.loads(Path(path).read_text()))


def new_run(state_dir, *, task=None, text=None, digits=2, tokenizer_kind="char", vocab_size=None,
            model=DEFAULT_PRESET, block_size=None, model_overrides=None, train_config=None, seed=1337, **settings):
    """Prepare a new run in state_dir: shards, tokenizer, run.json and theta_global(0).
    Everything is validated before the directory is created."""
    state_dir = Path(state_dir)
    settings = RunSettings(uuid.uuid4().hex[:12], {}, {}, {}, extra={"preset": model}, **settings)
    if settings.compression not in COMPRESSIONS:
        raise UserError(f"unknown compression {settings.compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    lr, momentum = outer_defaults(settings.compression)
    settings.outer_lr = lr if settings.outer_lr is None else settings.outer_lr
    settings.outer_momentum = momentum if settings.outer_momentum is None else settings.outer_momentum
    if not 0 < settings.topk_fraction <= 1:
        raise UserError(f"--topk-fraction must be in (0, 1], not {settings.topk_fraction}")
    if settings.aggregation not in AGGREGATIONS:
        raise UserError(f"unknown aggregation {settings.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    if not 1 <= settings.round_growth <= 1000:
        raise UserError(f"--round-growth must be between 1 and 1000, not {settings.round_growth}")
    if settings.tokens_per_round < 1 or settings.max_tokens < 1:
        raise UserError("--tokens-per-round and --max-tokens must be positive")
    if not 0 <= settings.inner_steps <= 100_000:
        raise UserError(f"--inner-steps must be between 0 and 100000, not {settings.inner_steps}")
    t = make_task(task, text, digits, None, tokenizer_kind, vocab_size, block_size)
    bs = block_size or t.block_size
    t.check_block_size(bs)
    config = GPTConfig.from_preset(model, t.tokenizer.vocab_size, bs, **(model_overrides or {}))
    shards = t.shard_set(settings.shard_tokens, bs)
    cfg = train_config or SWARM_TRAIN
    private_dir(state_dir)
    shards.write(state_dir / "shards")
    t.tokenizer.save(state_dir / "tokenizer.json")
    settings.task, settings.model, settings.train = t.meta(), config.to_dict(), cfg.to_dict()
    torch.manual_seed(seed)
    theta = GPT(config)
    save_round(state_dir, theta, t.tokenizer, settings, round_=0, tokens_trained=0,
               momentum={k: torch.zeros_like(v) for k, v in checkpoint.model_tensors(theta).items()})
    point_latest(state_dir, 0)
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


def swarm_token(state_dir, token=None, rotate=False):
    """(swarm token, rotated): the one given (saved, so a restart keeps it), a new random one if
    rotate, else the saved one, else a new one. rotated: it differs from the one saved before
    (every session is then revoked). The file is the owner's only, from its first byte."""
    path = Path(state_dir) / "token"
    saved = path.read_text().strip() if path.exists() else None
    if rotate:
        token = secrets.token_urlsafe(24)
    token = token or saved or secrets.token_urlsafe(24)
    if token != saved:
        write_private(path, token)
    return token, saved is not None and token != saved


def read_shards(state_dir):
    return ShardSet.read(Path(state_dir) / "shards")

